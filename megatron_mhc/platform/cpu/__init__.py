"""Run Megatron-Core and ``megatron.training`` on CPU, with the gloo backend, when there is no GPU.

Megatron 0.19.2 assumes CUDA in a number of places on the code paths of a CPU run (GPT model with
the local spec under TP / PP / DP, its pipeline schedules, DDP, the optimizers including the
distributed one, ``megatron.training.pretrain`` with torch_dist checkpoints).
:func:`apply_cpu_platform` patches exactly those places so that "the CUDA device" of each process
is its CPU, and changes nothing else. The patches, one module per area of Megatron they touch:

* :mod:`.device`: ``torch.cuda.current_device()`` / ``synchronize()``, ``Tensor.cuda()`` /
  ``Module.cuda()`` and the ``device="cuda"`` literals resolve to the CPU;
* :mod:`.rng`: the CPU default generator, which dropout on CPU tensors draws from, takes the
  place of the CUDA default generator (RNG tracker, rerun state machine, checkpoints);
* :mod:`.streams`: CUDA streams and events (DDP, the combined 1F1B schedule, the ``alltoall``
  MoE token dispatcher, the mHC MLP update's high-priority stream) become ordered CPU no-ops;
* :mod:`.optimizer`: the optimizers' checks of ``torch.cuda.*Tensor`` type names accept the CPU
  tensors;
* :mod:`.initialize`: ``megatron.training``'s start-up: one device per process,
  ``initialize_megatron(allow_no_cuda=True)`` in ``pretrain``, no GPU architecture query, a JIT
  warm-up that leaves the weights' generator alone.

Nothing happens at import: call :func:`apply_cpu_platform` once per process, before Megatron
builds anything. It is idempotent and does nothing when CUDA is available. Every replaced name is
a :class:`~megatron_mhc.megatron_patches.MegatronPatch` in :data:`CPU_PLATFORM_PATCHES`, all
checked (megatron-core version, name, signature) before the first is made. Each patch replaces a
name in the namespace of the Megatron module that looks it up (a module's own view of ``torch``
or ``torch.cuda`` where Megatron calls ``torch.<name>`` / ``torch.cuda.<name>``:
:mod:`.module_views`), except the few that :mod:`.device` and :mod:`.streams` replace on torch
itself.

Also needed on CPU, outside the patches:

* the megatron.training flags :data:`CPU_MEGATRON_ARGS`, or for Megatron-Core alone the
  equivalent ``TransformerConfig`` fields :data:`CPU_CONFIG_FIELDS` (``use_cpu_initialization``,
  the local layer spec, no fusions), and the environment :data:`CPU_ENV`, set before ``torch`` is
  imported (:mod:`.settings`);
* for bit-exact resume, a DataLoader with its own ``generator``: creating a DataLoader iterator
  draws a base seed from the default generator when the loader has none. On GPU that is harmless;
  on CPU it is the generator dropout uses, and megatron.training creates the iterators after
  restoring the RNG state from the checkpoint, so a resumed run would draw its dropout masks one
  step off the uninterrupted run.
* ``initialize_megatron`` called directly (not through ``pretrain``) needs
  ``allow_no_cuda=True``.

Not patched, so still CUDA-only or unverified on CPU: Transformer Engine, CUDA graphs, fused
kernels, the ``flex`` MoE token dispatcher (DeepEP / HybridEP), fine-grained activation
offloading, overlapped gradient reduction / parameter gather, async checkpoint saving,
inference. Resuming with ``--use-distributed-optimizer`` fails without Apex / Transformer Engine
on any device (``DistributedOptimizer.state_dict`` asserts on the empty torch optimizer state).
"""

import torch

from megatron_mhc.megatron_patches import check_patches
from megatron_mhc.platform.cpu.device import DEVICE_PATCHES, apply_device_patches
from megatron_mhc.platform.cpu.initialize import INITIALIZE_PATCHES, apply_initialize_patches
from megatron_mhc.platform.cpu.optimizer import TYPE_CHECK_PATCHES, apply_type_check_patches
from megatron_mhc.platform.cpu.rng import RNG_PATCHES, apply_rng_patches
from megatron_mhc.platform.cpu.settings import CPU_CONFIG_FIELDS, CPU_ENV, CPU_MEGATRON_ARGS
from megatron_mhc.platform.cpu.streams import STREAM_PATCHES, apply_stream_patches

__all__ = [
    "CPU_CONFIG_FIELDS",
    "CPU_ENV",
    "CPU_MEGATRON_ARGS",
    "CPU_PLATFORM_PATCHES",
    "apply_cpu_platform",
    "cpu_platform_applied",
]

# Every name the CPU platform replaces, checked before the first is replaced.
CPU_PLATFORM_PATCHES = (
    *DEVICE_PATCHES,
    *RNG_PATCHES,
    *STREAM_PATCHES,
    *TYPE_CHECK_PATCHES,
    *INITIALIZE_PATCHES,
)

_applied = False


def cpu_platform_applied() -> bool:
    """Whether this process runs on the CPU platform (apply_cpu_platform patched it)."""
    return _applied


def apply_cpu_platform() -> bool:
    """Patch Megatron-Core and megatron.training to run on CPU, if no CUDA device is present.

    Returns True if it patched; False if there was nothing to do: CUDA is available (nothing is
    patched), or the patches are already applied in this process. Raises MegatronPatchError,
    having patched nothing, if a patch does not fit the installed Megatron.
    """
    global _applied
    if _applied or torch.cuda.is_available():
        return False
    check_patches(CPU_PLATFORM_PATCHES)
    apply_device_patches()
    apply_rng_patches()
    apply_stream_patches()
    apply_type_check_patches()
    apply_initialize_patches()
    _applied = True
    return True
