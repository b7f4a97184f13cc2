#!/usr/bin/env bash
# The GPU check, for a CUDA machine (CI has none): the CUDA tests (fp32 parity on the official
# fixtures, fp16/bf16 deviation and text agreement) and the model bench on CUDA (Base and Large).
# Prints one table; meant to finish well inside 10 minutes on one H100/H200.
#   bench/gpu_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)' || exit 2
echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu -s 2>&1 | tail -15
status=${PIPESTATUS[0]}
echo "== model bench on CUDA (fp32, then bf16 autocast)"
"$PY" -m bench.bench_model --device cuda --sizes base large --no-baseline --repeats 5
"$PY" -m bench.bench_model --device cuda --sizes base large --no-baseline --repeats 5 --dtype bf16
exit "$status"
