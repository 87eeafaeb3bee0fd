#!/usr/bin/env bash
# Rebuilds bench/results/quality.json and quality.png from the committed per-model JSON (runs nothing else).
[ -f .venv/bin/activate ] && . .venv/bin/activate
R=bench/results
python -m modegpt_rt.bench.quality --rate dense=0 --rate 20%=0.2 --rate 30%=0.3 --rate 40%=0.4 \
  --rate "20% refit=0.2" --rate "30% refit=0.3" --rate "20% attn 0.5=0.2" --rate "30% attn 0.5=0.3" --rate "40% attn 0.5=0.4" \
  --series "20%=paper (refit none)" --series "30%=paper (refit none)" --series "40%=paper (refit none)" \
  --series "20% refit=refit all (default)" --series "30% refit=refit all (default)" --series "20% attn 0.5=refit all, attn ratio 0.5 (demo)" --series "30% attn 0.5=refit all, attn ratio 0.5 (demo)" --series "40% attn 0.5=refit all, attn ratio 0.5 (demo)" \
  --ppl-json dense=$R/ppl_dense.json --ppl-json 20%=$R/ppl_0.2.json --ppl-json 30%=$R/ppl_0.3_global.json --ppl-json 40%=$R/ppl_0.4.json \
  --ppl-json "20% refit=$R/ppl_0.2-refit32.json" --ppl-json "30% refit=$R/ppl_0.3-refit32.json" --ppl-json "20% attn 0.5=$R/ppl_0.2-a0.5.json" --ppl-json "30% attn 0.5=$R/ppl_0.3-a0.5.json" --ppl-json "40% attn 0.5=$R/ppl_0.4-a0.5.json" \
  --zeroshot-json dense=$R/zeroshot_dense.json --zeroshot-json 20%=$R/zeroshot_0.2.json --zeroshot-json 30%=$R/zeroshot_0.3.json --zeroshot-json 40%=$R/zeroshot_0.4.json \
  --zeroshot-json "20% refit=$R/zeroshot_0.2-refit32.json" --zeroshot-json "30% refit=$R/zeroshot_0.3-refit32.json" --zeroshot-json "20% attn 0.5=$R/zeroshot_0.2-a0.5.json" --zeroshot-json "30% attn 0.5=$R/zeroshot_0.3-a0.5.json" --zeroshot-json "40% attn 0.5=$R/zeroshot_0.4-a0.5.json" \
  --throughput-json $R/cpu_throughput.json \
  --speed "20% attn 0.5=$R/cpu_interleaved_a0.5_20_40.json@out/smollm2-0.2-a0.5" --speed "30% attn 0.5=$R/cpu_interleaved_a0.5.json@out/smollm2-0.3-a0.5" --speed "40% attn 0.5=$R/cpu_interleaved_a0.5_20_40.json@out/smollm2-0.4-a0.5" \
  --json $R/quality.json
modegpt plot bench/results/quality.json
