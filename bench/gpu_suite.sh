#!/usr/bin/env bash
# Every GPU check and benchmark of the fused kernels in one command, for a machine with a GPU,
# including one without network access that has its own python3 with torch and triton.
#
# Prepare, on a machine with network access, the wheels the GPU machine lacks (about 4 MB; the
# .whl/ folder is git-ignored; copy it along with the repository):
#     bash bench/gpu_suite.sh --fetch-wheels
# then, on the GPU machine, in the repository root:
#     bash bench/gpu_suite.sh [RESULTS_DIR]        # default: $OUT, else bench/results
# It installs the wheels into /tmp/site, then runs, each with its log in RESULTS_DIR:
#   0. `python -m megatron_mhc.transformer.kernel_check` (what `mhc_kernel_backend=auto` picks
#      on this GPU: each fused backend checked op by op against the reference, the HC module
#      timed) and the GPU test of that check (it passes for Triton at n=4, C=4096, bf16; `auto`
#      takes a fused backend; its time printed);
#   1. the GPU tests: Triton kernels at ragged and real sizes, the cuTile kernels (forced on any
#      CUDA GPU, MHC_CUTILE_TEST_FORCE=1: on Hopper they are expected to fail to compile with
#      the tileiras that cuda-tile 1.7.0 uses), the high-priority stream, context parallelism
#      (CP=2 equals CP=1; needs 2 GPUs and Transformer Engine, skipped without them), the MLP's
#      HC update node on the high-priority stream under the EP all-to-all overlap (bitwise the
#      same losses with and without it; needs 2 GPUs, skipped without them), an fp16 mHC run
#      with the distributed optimizer saved at iteration 3 and resumed bit for bit (2 GPUs);
#   2. bench/bench_kernels.py (ours, the reference, torch.compile, and the peers that import);
#   3. bench/bench_step.py (baseline vs mHC, torch and triton backends);
#   4. bench/activation_memory.py on the GPU (peak allocated memory, CUDA-event times).
# Every step runs even if an earlier one failed; the exit status is that of the first failure.
# ONLY="triton_tests bench_step" runs just the steps named (a call may last 10 minutes at most).
# Peers: Liger-Kernel is in the wheel set; DeepSeek TileKernels needs tilelang (50 MB, plus
# apache-tvm-ffi and z3-solver) and torch >= 2.13, and Transformer Engine 2.20 is far over the
# 64 MiB a call may carry: fetch those for a separate call (--fetch-wheels tile_kernels).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(megatron-core==0.19.2 cuda-tile==1.7.0 liger-kernel==0.8.5 pytest-timeout==2.4.0)
PEER_WHEELS=(tile-kernels==2.1.0 tilelang==0.1.15 "apache-tvm-ffi>=0.1.11,<0.1.13"
             torch-c-dlpack-ext cloudpickle ml-dtypes "z3-solver>=4.13.0,<4.15.5")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    wanted=("${WHEELS[@]}")
    [[ "${2:-}" == "tile_kernels" ]] && wanted=("${PEER_WHEELS[@]}")
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 -d .whl "${wanted[@]}"
fi

RESULTS=${1:-${OUT:-bench/results}}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

status=0
step() {  # step NAME COMMAND...: run, log to RESULTS/NAME.log, remember the first failure
    local name=$1
    shift
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return
    echo "== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/device.txt"
step backend_check python3 -m megatron_mhc.transformer.kernel_check
step verification_tests python3 -m pytest -q -rs -s -p no:cacheprovider \
    tests/unit/test_backend_verification.py -k gpu
step triton_tests python3 -m pytest -q -rs -p no:cacheprovider tests/unit/test_fused_kernels.py \
    -k "on_gpu and triton"
step stream_tests python3 -m pytest -q -rs -p no:cacheprovider tests/unit/test_high_priority_stream.py
step cutile_tests env MHC_CUTILE_TEST_FORCE=1 python3 -m pytest -q -rs -p no:cacheprovider \
    tests/unit/test_fused_kernels.py -k "on_gpu and cutile"
step context_parallel_tests python3 -m pytest -q -rs -p no:cacheprovider \
    tests/functional/test_context_parallel_gpu.py
step overlap_tests python3 -m pytest -q -rs -p no:cacheprovider tests/functional/test_overlap_gpu.py
step fp16_resume_test python3 -m pytest -q -rs -p no:cacheprovider \
    tests/functional/test_optimizer_resume.py -k gpu_fp16
step bench_kernels python3 bench/bench_kernels.py
step bench_step python3 bench/bench_step.py
step activation_memory python3 bench/activation_memory.py
exit $status
