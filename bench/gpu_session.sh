#!/usr/bin/env bash
# One short session on a lent GPU machine (the `device` tool): the device engine's tests on CUDA
# tensors, then the side-by-side bench of docs/benchmarks.md. Results go under $OUT.
#
#   run: bash bench/gpu_session.sh          (carry .whl: a cp312 msgspec wheel, see below)
#
# The machine has torch, triton and transformers but no msgspec and no network, so a wheel
# travels in .whl/ (pip download --only-binary=:all: --python-version 3.12 ... msgspec).
set -u
OUT=${OUT:-/tmp/xray-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers, numpy, msgspec; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'msgspec', msgspec.__version__)"
    lscpu | sed -n '1,20p'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# the compiled kernels against numpy (the subnormal case says whether the GPU flushes them)
timeout "${TEST_S:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_device_engine.py -m "not slow" 2>&1 \
    | tee "$OUT/tests.txt"
# sized for a 15-minute lease: ~2.5 minutes on an H200 (the machine's start and the tests besides)
timeout "${BENCH_S:-360}" python3 bench/gpu.py --rounds "${ROUNDS:-3}" \
    ${BENCH_ARGS:---block 20 --configs baseline,probe/10,probe/1,tensorboard/10,histc/10 --profile 6} 2>&1 | tee "$OUT/gpu_bench.txt"
