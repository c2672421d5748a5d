"""A worker process whose Triton kernels run in Triton's CPU interpreter, for the kernel tests.

TRITON_INTERPRET=1 must be in the environment before the process imports triton (Megatron and
torch's inductor import it): Triton's own library functions (`tl.sum`, ...) take the interpreted
form only then, so it cannot be set later in the pytest process. `interpreter_pool()` spawns one
worker with it in its environment from its first line (the pytest process is left as it was),
with the portable CPU numerics too: the gating factors' gradients are sums over all tokens that
cancel, and how close the fp32 reference comes to float64 there depends on the CPU's kernels.
"""

import multiprocessing
import os

import torch

from megatron_mhc.platform.cpu import CPU_ENV
from tests.dist_utils import environment
from tests.functional.pretrain_runs import PORTABLE_CPU_NUMERICS

WORKER_ENV = {
    **CPU_ENV,
    **PORTABLE_CPU_NUMERICS,
    "TRITON_INTERPRET": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def _enter_interpreter():
    os.environ.update(WORKER_ENV)
    # Thousands of tiny tensor ops (interpreted or emulated kernels): torch's intra-op threads
    # only add synchronisation, which costs up to seconds per check on busy shared cores.
    torch.set_num_threads(1)


def interpreter_pool():
    """A one-process pool whose worker has TRITON_INTERPRET=1 from its start."""
    with environment(WORKER_ENV):  # inherited by the spawned worker from its first line
        return multiprocessing.get_context("spawn").Pool(1, initializer=_enter_interpreter)
