#!/usr/bin/env bash
# One short session on a lent GPU machine (the `device` tool): ~10 minutes, everything under $OUT.
#
#   run: bash bench/gpu_session.sh        (carry .whl: a cp312 msgspec wheel, see below)
#
# In order of value, each step with its own timeout and the whole under BUDGET_S seconds (a step
# that would start past it is skipped and says so), so one try of a 15-minute lease gives a result:
#   1. machine.txt     the GPU, driver, versions
#   2. roofline.txt    bench/roofline.py on GPT-2 small bf16 16 x 1024: each launch's GB/s against the
#                      device's peak and the must-read floor, and the engine variants side by side
#                      (roofline.json beside it). Needs no msgspec.
#   3. tests.txt       the device engine's tests on CUDA tensors (compiled kernels against numpy)
#   4. gpu_bench.txt   bench/gpu.py: baseline / probe every=10 and 1 / TensorBoard / histc side by side
#   5. scaling.txt     bench/roofline.py measured on GPT-2 medium and the LLaMA-style 1.2 B config
#
# The machine has torch, triton and transformers but no msgspec and no network, so a wheel travels
# in .whl/ (untracked, carried by the working tree): on this machine, from the repository root,
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl msgspec
# Knobs: ROUNDS, BENCH_ARGS (bench/gpu.py), VARIANTS (roofline), TEST_S, BENCH_S, ROOF_S, BUDGET_S.
set -u
OUT=${OUT:-/tmp/xray-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
BUDGET_S=${BUDGET_S:-570}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
    python3 -c "import msgspec; print('msgspec', msgspec.__version__)" || echo "no msgspec: steps 3 and 4 will fail (see the header)"
    lscpu | sed -n '1,20p'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# step NAME SECONDS COMMAND...: run it under its timeout unless the budget is spent
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 30)); then
        echo "== $name: skipped, ${SECONDS}s of the ${BUDGET_S}s budget spent" | tee -a "$OUT/skipped.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at ${SECONDS}s, limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUT/$name.txt"
}

# the variants: base is the engine as committed; tail=0 puts the mask back on every block of the loop
# (scalar loads again; the flag-free checks and float counts stay); iters/block/warps resize the programs
# (bench/roofline.py --sm90 gives each one's registers and resident CTAs without a GPU)
VARIANTS=${VARIANTS:-base,tail=0,iters=16,iters=8,warps=8,block=1024+warps=8}
step roofline "${ROOF_S:-150}" python3 bench/roofline.py --device cuda --repeat 3 --variants "$VARIANTS" \
    --json-out "$OUT/roofline.json"
# the compiled kernels against numpy (the subnormal case says whether the GPU flushes them)
step tests "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_device_engine.py tests/test_roofline.py \
    -m "not slow"
# sized for the lease: ~2.5 minutes on an H200
step gpu_bench "${BENCH_S:-240}" python3 bench/gpu.py --rounds "${ROUNDS:-3}" \
    ${BENCH_ARGS:---block 20 --configs baseline,probe/10,probe/1,tensorboard/10,histc/10 --profile 6}
step scaling_medium 60 python3 bench/roofline.py --device cuda --model gpt2-medium --repeat 3 \
    --json-out "$OUT/roofline_medium.json"
step scaling_llama 90 python3 bench/roofline.py --device cuda --model llama-1b --repeat 2 \
    --json-out "$OUT/roofline_llama.json"
echo "done at ${SECONDS}s; files in $OUT"
