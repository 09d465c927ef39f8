# Sourced by demo/run.sh and demo/ablate.sh: the demo data under RUN_DIR (written once). Expects
# RUN_DIR; sets PY, EVIP_DEMO_DATA and start (for the wall time). The LLM is the named asset
# `smollm2` (base.source in the pipeline files): the real SmolLM2 GGUF as an HF directory.
PY=${PYTHON:-.venv/bin/python}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}   # DeepSpeed's op, built by make setup
export EVIP_DEMO_DATA="$(realpath -m "$RUN_DIR/data")"   # where demo/recipes/*.yaml look for the shards (absolute)
start=$(date +%s)

if [ ! -f "$EVIP_DEMO_DATA/manifest.json" ]; then
  "$PY" -m evip.cli demo-data "$EVIP_DEMO_DATA" --n-heldout 100
fi
