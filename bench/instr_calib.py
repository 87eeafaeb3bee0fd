"""Calibration windows from the model's own answers to generic instructions (no evaluation data):

    python bench/instr_calib.py OUT.pt   # 32 x 2048 tokens

Seventh-session experiment (see bench/hellaswag_calib.py).
"""

import sys
import time

import torch

import modegpt_rt

TOPICS = """cooking rice; baking bread; saving money; planting tomatoes; cleaning a kitchen; training a puppy;
learning a language; writing a resume; preparing for an interview; fixing a leaky faucet;
painting a room; caring for a cat; running a first 5k; making coffee; organizing a closet;
studying for exams; starting a small business; changing a car tire; washing clothes;
sleeping better; packing for a trip; making friends in a new city; taking care of houseplants;
cutting hair at home; applying makeup; playing the guitar; knitting a scarf; building a birdhouse;
setting up a fish tank; grilling steak; reducing stress; teaching a child to ride a bike;
removing a stain; decorating a cake; writing a thank-you note; stretching after exercise;
camping in the woods; shopping for groceries on a budget; recycling at home; dressing for winter""".replace(
    "\n", " "
).split(";")
KINDS = [
    "How do I go about {t}?",
    "Explain the steps of {t} to a beginner.",
    "What are common mistakes when {t}?",
    "Write a short story about someone {t}.",
    "Give me five tips about {t}.",
    "Describe what happens during {t}.",
]
QUESTIONS = [
    "Why is the sky blue?",
    "How do plants make food?",
    "What causes the seasons?",
    "How does a refrigerator work?",
    "Why do we need sleep?",
    "What is gravity?",
    "How do vaccines work?",
    "Why does ice float?",
    "What is the water cycle?",
    "How do birds fly?",
    "What happens when metal rusts?",
    "How does the heart pump blood?",
]


def main(out, windows=32, seqlen=2048, seed=0):
    torch.set_num_threads(2)
    m = modegpt_rt.load(None)
    tok = m.tokenizer
    prompts = [k.format(t=t.strip().removeprefix("a ").strip()) for t in TOPICS for k in KINDS] + QUESTIONS
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    stream, need, t0, b = [], windows * seqlen, time.time(), 0
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    while len(stream) < need:
        batch = [prompts[order[(b * 16 + i) % len(prompts)]] for i in range(16)]
        chats = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
            for p in batch
        ]
        outs = m.generate(
            chats, max_new_tokens=320, temperature=0.8, top_p=0.95, seed=seed + b, stop=[eos], tokenizer=None
        )
        for p, o in zip(batch, outs):
            text = p + "\n" + tok.decode(o.token_ids, skip_special_tokens=True).strip() + "\n\n"
            stream += tok(text)["input_ids"]
        b += 1
        print(f"batch {b}: {len(stream)}/{need} tokens, {time.time() - t0:.0f} s", flush=True)
    calib = torch.tensor(stream[:need]).view(windows, seqlen)
    torch.save(calib, out)
    print(tok.decode(calib[0, :400]))


if __name__ == "__main__":
    main(sys.argv[1])
