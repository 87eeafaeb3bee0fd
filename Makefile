# The two commands of the README.
#   make demo   set up from nothing, compress SmolLM2-135M by 30% (refit all, attention ratio 0.5), evaluate it, generate with it
#   make test   set up from nothing and run the test suite
SAMPLES ?= 128
SEQLEN ?= 2048
RATE ?= 0.3
ALLOCATION ?= global
MAX_LAYER_SPARSITY ?= 0.5
REFIT ?= all
ATTN_RATIO ?= 0.5
OUT ?= out/smollm2-$(RATE)
VENV := .venv/bin

.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/modegpt compress --rate $(RATE) --allocation $(ALLOCATION) --max-layer-sparsity $(MAX_LAYER_SPARSITY) --refit $(REFIT) --attn-ratio $(ATTN_RATIO) --samples $(SAMPLES) --seqlen $(SEQLEN) --out $(OUT) --overwrite
	$(VENV)/modegpt eval ppl $(OUT) --limit 16
	$(VENV)/modegpt generate $(OUT) "The history of the Roman Empire" --max-new-tokens 48

test: setup
	$(VENV)/python -m pytest -q -p no:cacheprovider tests

lint:
	$(VENV)/ruff check . && $(VENV)/ruff format --check .
