#!/usr/bin/env bash
# The GPU run in one command: full-size parity against diffusers/transformers
# (gpu_check.py), then the benchmark beside diffusers (bench.py --vs-diffusers).
# About 6 minutes on one H200, at most 8 (every time limit below reached: 50 + 165 + 265 s = 480 s);
# BENCHMARKS.md says what the numbers mean.
#
#   bash bench/gpu_run.sh    # from the repository root on the GPU machine, with .whl/ carried (diffusers is not installed there)
#
# Logs and JSON go to $OUT (default ./gpu_out): env.txt, gpu_check.{log,json}, bench.{log,json}.
# Each script has a hard time limit (an interrupt, then a kill 10-15 s later), so one hung section
# cannot take the other script's results with it; both save their JSON after every section.
# BENCH_BUDGET_S (default 220) is the benchmark's own budget, past which it skips sections.
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: model/, tests/, .whl/
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
budget=${BENCH_BUDGET_S:-220}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi -L
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# The tests that need CUDA (named *gpu*: DDIM without host-device sync, initial noise as diffusers draws it, CUDA graphs).
timeout -s INT -k 10 40 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/test_ddim.py tests/test_speed.py -k gpu 2>&1 | tee "$OUT/gpu_tests.log"
timeout -s INT -k 15 150 python3 -m bench.gpu_check --budget-s 110 --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout -s INT -k 15 $((budget + 30)) python3 -m bench.bench --vs-diffusers --budget-s "$budget" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
