#!/usr/bin/env bash
# The GPU check, for a CUDA machine (CI has none), each part printing its table:
#   1. the CUDA tests (fp32 parity on the official fixtures, fp16/bf16 deviation and text agreement);
#   2. the model bench on CUDA, Base and Large x batch 1/8/32, fp32 then bf16 autocast;
#   3. cross-job batching with the GPU worker on CUDA (50 concurrent 3-s jobs, with vs without);
#   4. the long-video bench (a 2-minute talk, one CPU worker, the GPU worker on CUDA).
# Meant to finish inside 10 minutes on one H100/H200 with its host's cores.
#   bench/gpu_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
# GPU_CHECK_QUICK=1 runs the same steps with tiny sizes on whatever device there is (to check the
# script itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
if [[ "${GPU_CHECK_QUICK:-}" == 1 ]]; then
    DEVICE=cpu; SIZES=(tiny); BATCHES=(1 2); JOBS=6; SECONDS_LONG=20; DTYPE2=()
else
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)' || exit 2
    DEVICE=cuda; SIZES=(base large); BATCHES=(1 8 32); JOBS=50; SECONDS_LONG=120; DTYPE2=(--dtype bf16)
fi
status=0
echo "== 1. CUDA tests"
if [[ "$DEVICE" == cuda ]]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/gpu -s 2>&1 | tail -15
    status=${PIPESTATUS[0]}
else
    echo "(skipped: no CUDA)"
fi
echo "== 2. model bench on $DEVICE (fp32, then bf16)"
"$PY" -m bench.bench_model --device "$DEVICE" --sizes "${SIZES[@]}" --batch "${BATCHES[@]}" --no-baseline --repeats 3 || status=1
if [[ ${#DTYPE2[@]} -gt 0 ]]; then
    "$PY" -m bench.bench_model --device "$DEVICE" --sizes "${SIZES[@]}" --batch "${BATCHES[@]}" --no-baseline --repeats 3 "${DTYPE2[@]}" || status=1
fi
echo "== 3. cross-job batching, GPU worker on $DEVICE"
AVSR_DEVICE="$DEVICE" "$PY" -m bench.bench_batching --jobs "$JOBS" --size "${SIZES[0]}" || status=1
echo "== 4. long video, GPU worker on $DEVICE"
AVSR_DEVICE="$DEVICE" "$PY" -m bench.bench_long --seconds "$SECONDS_LONG" --workers 1 --size "${SIZES[0]}" || status=1
exit "$status"
