"""Run Megatron-Core and ``megatron.training`` on CPU, with the gloo backend, when there is no GPU.

Megatron 0.19.2 assumes CUDA in a number of places on the code paths of a CPU run (GPT model with
the local spec under TP / PP / DP, its pipeline schedules, DDP, the optimizers including the
distributed one, ``megatron.training.pretrain`` with torch_dist checkpoints).
:func:`apply_cpu_platform` patches exactly those places so that "the CUDA device" of each process
is its CPU, and changes nothing else:

* ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` and ``Tensor.cuda()`` /
  ``Module.cuda()`` (called from hundreds of sites) resolve to the CPU;
* the ``device="cuda"`` literals of the modules listed in ``_MODULES_WITH_CUDA_LITERALS`` place
  their tensors on the CPU;
* the CPU default generator, which dropout on CPU tensors draws from, takes the place of the CUDA
  default generator: the RNG tracker of ``tensor_parallel/random.py`` keeps and forks CPU
  generator states, so ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()``
  give tensor-parallel-rank-dependent dropout as on GPU, and the rerun state machine and
  checkpoints save and restore it;
* CUDA streams become torch.cpu's device-agnostic single stream;
* the streams and events of the combined 1F1B schedule (``overlap_moe_expert_parallel_comm``)
  and of the ``alltoall`` MoE token dispatcher become ordered no-ops: the CPU runs every op when
  it is issued, so the order of operations is the order in which the schedule issues them on
  GPU, and every event is complete when it is recorded; ``Tensor.record_stream`` is a no-op for
  CPU tensors; the dispatcher's split sizes become the host arrays it makes of them on GPU
  (``delay_wgrad_compute`` runs too: the local spec's linears, which have no deferred
  weight-gradient pass, compute their weight gradients in the ordinary backward);
* parameter type checks that expect ``torch.cuda.*Tensor`` names accept the CPU tensors;
* ``megatron.training``: one device per process, ``initialize_megatron(allow_no_cuda=True)`` in
  ``pretrain``, no GPU architecture query.

Nothing happens at import: call :func:`apply_cpu_platform` once per process, before Megatron
builds anything. It is idempotent and does nothing when CUDA is available. Every replaced name is
a :class:`~megatron_mhc.megatron_patches.MegatronPatch` in :data:`CPU_PLATFORM_PATCHES`, all
checked (megatron-core version, name, signature) before the first is made. Each patch replaces a
name in the namespace of the Megatron module that looks it up (a module's own view of ``torch``
or ``torch.cuda`` where Megatron calls ``torch.<name>`` / ``torch.cuda.<name>``), except the
four calls of the first item and ``Tensor.record_stream``, which are replaced on torch itself:
Megatron makes them from too many modules to list, and without a GPU they raise (so does
``record_stream`` on a CPU tensor), so no working code path changes.

Also needed on CPU, outside this module:

* the megatron.training flags :data:`CPU_MEGATRON_ARGS`, or for Megatron-Core alone the
  equivalent ``TransformerConfig`` fields :data:`CPU_CONFIG_FIELDS` (``use_cpu_initialization``,
  the local layer spec, no fusions);
* the environment :data:`CPU_ENV`, set before ``torch`` is imported: ``TORCHDYNAMO_DISABLE=1``
  (otherwise Megatron's ``jit_fuser`` functions go through ``torch.compile``: ~40 s of start-up
  on 2 cores) and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (``validate_args`` asserts it for TP or CP > 1
  on devices older than Blackwell, and the CPU reports no GPU architecture);
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

import contextlib
import functools
import logging
import types

import torch

from megatron_mhc.megatron_patches import MegatronPatch, check_patches

__all__ = [
    "CPU_CONFIG_FIELDS",
    "CPU_ENV",
    "CPU_MEGATRON_ARGS",
    "CPU_PLATFORM_PATCHES",
    "apply_cpu_platform",
]

# The TransformerConfig fields of CPU_MEGATRON_ARGS, for Megatron-Core used without
# megatron.training: weights initialised on the CPU, the local spec, no fused (CUDA-only) kernels.
CPU_CONFIG_FIELDS = dict(
    use_cpu_initialization=True,
    transformer_impl="local",
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)

# megatron.training flags that keep a CPU run off CUDA-only code paths.
CPU_MEGATRON_ARGS = [
    "--distributed-backend", "gloo",
    "--use-cpu-initialization",
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
    "--disable-jit-fuser",
]  # fmt: skip

# Environment of a CPU run, to set before torch is imported (see the module docstring).
CPU_ENV = {"TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}

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
    for patch in _PATCHES:
        patch()
    _applied = True
    return True


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _ModuleView(types.ModuleType):
    """A module (``torch`` or ``torch.cuda``) as one Megatron module sees it on CPU: the real
    module, except for the attributes set on the view."""

    def __init__(self, real: types.ModuleType):
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name):  # only called for names not set on the view
        return getattr(self._real, name)


def _torch_views(what: str, module_names: tuple[str, ...]) -> tuple[MegatronPatch, ...]:
    """The patches, described as `what`, of the `torch` name of each of `module_names`."""
    return tuple(MegatronPatch(f"CPU platform: {what}", name, "torch") for name in module_names)


def _override_torch_in(patch: MegatronPatch, cuda: dict | None = None, **torch_attrs) -> None:
    """In the Megatron module whose `torch` `patch` replaces, make `torch.<name>` resolve to
    `torch_attrs[name]` and `torch.cuda.<name>` to `cuda[name]`; every other name still resolves
    to torch's."""
    module_torch = patch.original()
    view = module_torch if isinstance(module_torch, _ModuleView) else _ModuleView(torch)
    if cuda:
        if not isinstance(view.cuda, _ModuleView):
            view.cuda = _ModuleView(torch.cuda)
        vars(view.cuda).update(cuda)
    vars(view).update(torch_attrs)
    patch.replace(view)


def _cpu_for_cuda(device):
    """The CPU for a CUDA `device` ("cuda", "cuda:1", 0, ...); any other device unchanged."""
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


def _cpu_if_cuda(factory):
    """Tensor factory `factory` (torch.zeros, ...) placing `device="cuda"` on the CPU."""

    @functools.wraps(factory)
    def on_cpu(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_for_cuda(device), **kwargs)

    return on_cpu


@contextlib.contextmanager
def _cpu_tensor_types_named_as_cuda():
    """While active, `Tensor.type()` names a CPU tensor's type as on GPU
    ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'), process-wide (Megatron calls the functions
    wrapped with it from the main thread)."""
    if "type" in vars(torch.Tensor):  # already active (nested call)
        yield
        return
    type_name = torch._C.TensorBase.type

    def type_as_on_gpu(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return type_name(self).replace("torch.", "torch.cuda.", 1)
        return type_name(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_on_gpu
    try:
        yield
    finally:
        del torch.Tensor.type  # torch.Tensor inherits `type` from torch._C.TensorBase


def _with_cpu_tensor_types_named_as_cuda(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _cpu_tensor_types_named_as_cuda():
            return function(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


_CURRENT_DEVICE = (
    MegatronPatch(
        "CPU platform: the CPU is the current device", "torch.cuda", "current_device", ()
    ),
    MegatronPatch("CPU platform: the CPU is the current device", "torch.cuda", "synchronize", ()),
)


def _cpu_is_the_current_device():
    # Megatron allocates with `device=torch.cuda.current_device()` in ~200 places (p2p shape and
    # tensor buffers, loss reductions, the batch broadcast, ...); the pipeline p2p code calls
    # `torch.cuda.synchronize()` after every exchange. Without a GPU both raise. torch.cpu has
    # their CPU counterparts for device-agnostic code (returns "cpu"; no-op).
    current_device, synchronize = _CURRENT_DEVICE
    current_device.replace(torch.cpu.current_device)
    synchronize.replace(torch.cpu.synchronize)


_CUDA_MOVES_TO_CPU = (
    MegatronPatch("CPU platform: .cuda() stays on the CPU", "torch.nn:Module", "cuda", ("device",)),
    # A builtin method, without an inspectable signature.
    MegatronPatch("CPU platform: .cuda() stays on the CPU", "torch:Tensor", "cuda"),
)


def _cpu_is_where_cuda_moves_to():
    # megatron.training moves the built model with `Module.cuda()` and every batch with
    # `Tensor.cuda()`, which raise without a GPU. On CPU, model and batch already are on "the
    # device", for which torch returns the object itself.
    def module_cuda(self, device=None):
        return self

    def tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    module_patch, tensor_patch = _CUDA_MOVES_TO_CPU
    module_patch.replace(module_cuda)
    tensor_patch.replace(tensor_cuda)


# Megatron modules that create tensors on a literal CUDA device (`device="cuda"`) on the code
# paths of a CPU run: the schedules' token counter; the default causal attention mask; the
# gradient norm (local multi-tensor L2 norm, clipping buffers); the optimizers' scale and
# found-inf tensors; the rerun state machine's reductions; the checkpoint iteration reduction;
# the training loop's start time, loss sums and exit flags; the JIT-function warm-up of
# initialize_megatron (unconditional, also with fusions off); the parameter-norm logging; the
# exchange buffers of a fully parallel checkpoint load (--ckpt-fully-parallel-load).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.training.checkpointing",
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.utils.common_utils",
)
_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "rand", "randn", "empty_like")
_CUDA_LITERALS = (
    *_torch_views("device='cuda' literals place tensors on the CPU", _MODULES_WITH_CUDA_LITERALS),
    MegatronPatch(
        "CPU platform: device='cuda' literals place tensors on the CPU",
        "megatron.core.dist_checkpointing.mapping:ShardedTensor",
        "init_data",
        ("device",),
    ),
)


def _cuda_literals_on_cpu():
    # Without a GPU, creating a tensor on device "cuda" raises. In the modules above, the tensor
    # factories place it on the CPU instead; so does ShardedTensor.init_data, to which the fully
    # parallel load passes "cuda".
    *module_views, init_data_patch = _CUDA_LITERALS
    factories = {name: _cpu_if_cuda(getattr(torch, name)) for name in _TENSOR_FACTORIES}
    for patch in module_views:
        _override_torch_in(patch, **factories)

    def cpu_init_data(init_data):
        @functools.wraps(init_data)
        def init_data_on_cpu(self, device, *args, **kwargs):
            return init_data(self, _cpu_for_cuda(device), *args, **kwargs)

        return init_data_on_cpu

    init_data_patch.wrap(cpu_init_data)


# Megatron modules that seed, save or restore the CUDA default generator with
# torch.cuda.manual_seed / get_rng_state / set_rng_state: the tensor-parallel RNG tracker, the
# rerun state machine (around every step) and checkpointing ('cuda_rng_state').
_MODULES_USING_THE_CUDA_GENERATOR = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.rerun_state_machine",
    "megatron.training.checkpointing",
)
_CPU_GENERATOR_IS_THE_CUDA_GENERATOR = (
    *_torch_views("the CPU generator is the CUDA generator", _MODULES_USING_THE_CUDA_GENERATOR),
    MegatronPatch(
        "CPU platform: the CPU generator is the CUDA generator",
        _MODULES_USING_THE_CUDA_GENERATOR[0],
        "_get_cuda_rng_state",
        ("device", "clone", "graph_safe"),
    ),
    MegatronPatch(
        "CPU platform: the CPU generator is the CUDA generator",
        _MODULES_USING_THE_CUDA_GENERATOR[0],
        "_set_cuda_rng_state",
        ("new_state", "device", "graph_safe"),
    ),
)


def _cpu_generator_is_the_cuda_generator():
    # Dropout on CPU tensors draws from the CPU default generator, so on CPU that generator plays
    # the part of the CUDA default generator. Without a GPU, torch.cuda.get_rng_state raises, and
    # torch.cuda.manual_seed / set_rng_state are queued for a CUDA initialization that never
    # comes. With this, the tracker's `add` and `model_parallel_cuda_manual_seed` seed and record
    # CPU generator states (one per tensor-parallel rank for dropout in TP regions, as on GPU).
    *module_views, get_patch, set_patch = _CPU_GENERATOR_IS_THE_CUDA_GENERATOR
    for patch in module_views:
        _override_torch_in(
            patch,
            cuda=dict(
                manual_seed=torch.manual_seed,
                get_rng_state=torch.get_rng_state,
                set_rng_state=torch.set_rng_state,
            ),
        )

    # The tracker's `fork` (and activation recomputation) swap states with these two helpers,
    # which read and write torch.cuda.default_generators[device].
    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        # torch.get_rng_state returns a copy (`clone`); CUDA graphs (`graph_safe`) need a GPU.
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    get_patch.replace(get_rng_state)
    set_patch.replace(set_rng_state)

    # `fork` warns when the CPU generator moved inside the fork, which on GPU means that CPU
    # random ops ran in a CUDA RNG region. On CPU the forked generator is the CPU one, so every
    # fork that draws a dropout mask would warn.
    logging.getLogger(_MODULES_USING_THE_CUDA_GENERATOR[0]).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )


# Megatron modules that use CUDA streams on the code paths of a CPU run: training.py builds DDP on
# a side stream; the DDP gradient buffers wait on the current stream before reducing.
_ONE_CPU_STREAM = _torch_views(
    "one CPU stream",
    ("megatron.core.distributed.param_and_grad_buffer", "megatron.training.training"),
)


def _one_cpu_stream():
    # torch.cuda.Stream / current_stream / stream raise without a GPU. The CPU runs one stream,
    # for which torch.cpu has device-agnostic Stream / current_stream / stream (all no-ops).
    for patch in _ONE_CPU_STREAM:
        _override_torch_in(
            patch,
            cuda=dict(
                Stream=torch.cpu.Stream,
                current_stream=torch.cpu.current_stream,
                stream=torch.cpu.stream,
            ),
        )


class _OrderedCPUStream(torch.cpu.Stream):
    """A CUDA stream on CPU, with the methods Megatron's overlap code calls on one.

    The CPU runs each op when it is issued, so work is ordered as the schedule issues it (the
    order of the GPU's compute and communication streams wherever events order them), and an
    event recorded on a stream is complete at once: waits and synchronizations are no-ops."""

    def __init__(self, device=None, priority: int = 0):
        super().__init__(priority)

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return 0, 0  # (lowest, highest) as torch.cuda.Stream: the CPU has a single priority

    def record_event(self, event: torch.cpu.Event | None = None) -> torch.cpu.Event:
        event = torch.cpu.Event() if event is None else event
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_ORDERED_CPU_STREAM = _OrderedCPUStream()


def _current_ordered_cpu_stream(device=None) -> _OrderedCPUStream:
    """torch.cpu's current stream (set by torch.cpu.stream) if it is an ordered one, else the
    default ordered stream: the one the schedule runs on outside any stream context."""
    stream = torch.cpu.current_stream()
    return stream if isinstance(stream, _OrderedCPUStream) else _DEFAULT_ORDERED_CPU_STREAM


# Megatron modules of the combined 1F1B schedule (overlap_moe_expert_parallel_comm) and of the
# alltoall token dispatcher that use CUDA streams and events: the dispatcher copies its split
# sizes to the host on a side stream and waits on the copy's event; ScheduleNode runs each node
# on its stream between an event wait and record, and set_streams creates the (high-priority)
# communication stream; the schedule plan records and waits on its chunk's event around the
# P2P hooks; the MoE callables record the residual on the current stream. The mHC MLP update's
# high-priority stream (mhc_mlp_high_priority_stream) is one of them too, so that its stream
# branch runs on CPU.
_TOKEN_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_ORDERED_CPU_STREAMS = _torch_views(
    "ordered CPU streams and events",
    (
        _TOKEN_DISPATCHER,
        "megatron.core.pipeline_parallel.utils",
        "megatron.core.models.common.model_chunk_schedule_plan",
        "megatron.core.models.gpt.fine_grained_callables",
        "megatron_mhc.transformer.high_priority_stream",
    ),
)


def _ordered_cpu_streams_and_events():
    # torch.cuda.Stream / Event / current_stream raise without a GPU. torch.cpu's device-agnostic
    # Stream lacks what these modules call (Stream(device=..., priority=...),
    # Stream.priority_range(), stream.record_event() returning the event the dispatcher
    # synchronizes on); _OrderedCPUStream adds it, and torch.cpu.Event is already an event
    # complete when recorded.
    for patch in _ORDERED_CPU_STREAMS:
        _override_torch_in(
            patch,
            cuda=dict(
                Stream=_OrderedCPUStream,
                Event=torch.cpu.Event,
                current_stream=_current_ordered_cpu_stream,
                stream=torch.cpu.stream,
            ),
        )


# A builtin method, without an inspectable signature.
_RECORD_STREAM = MegatronPatch(
    "CPU platform: record_stream is a no-op for CPU tensors", "torch:Tensor", "record_stream"
)


def _record_stream_is_a_no_op_for_cpu_tensors():
    # ScheduleNode (freeing a node's inputs, its output gradients), the MoE callables (the
    # residual) and the dispatcher's host copies call `tensor.record_stream(stream)` so that
    # CUDA's caching allocator does not reuse a block while another stream may still read it.
    # CPU memory is not allocated per stream, and record_stream raises for a CPU tensor
    # ("unknown parameter type"); CUDA tensors keep torch's record_stream.
    def unless_on_cpu(record_stream):
        @functools.wraps(record_stream)
        def record_stream_unless_on_cpu(self, stream):
            if self.device.type != "cpu":
                record_stream(self, stream)

        return record_stream_unless_on_cpu

    _RECORD_STREAM.wrap(unless_on_cpu)


_SPLIT_SIZES = MegatronPatch(
    "CPU platform: the dispatcher's split sizes are host arrays",
    _TOKEN_DISPATCHER,
    "maybe_move_tensor_to_cpu",
    ("tensor", "as_numpy", "record_stream"),
)


def _split_sizes_are_host_arrays():
    # The alltoall dispatcher moves its split sizes to the host with maybe_move_tensor_to_cpu
    # (imported by name into token_dispatcher), which converts only CUDA tensors: on GPU they
    # become numpy arrays (as_numpy=True); on CPU they would stay tensors, which
    # torch.distributed.all_to_all_single rejects as split sizes. The same conversion for CPU
    # tensors.
    def also_for_cpu_tensors(maybe_move_tensor_to_cpu):
        @functools.wraps(maybe_move_tensor_to_cpu)
        def move_to_host(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
                return tensor.numpy()
            return maybe_move_tensor_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

        return move_to_host

    _SPLIT_SIZES.wrap(also_for_cpu_tensors)


# The parameters whose types these check.
_CUDA_TYPE_CHECKS = tuple(
    MegatronPatch("CPU platform: CPU tensors pass CUDA type checks", owner, name, parameters)
    for owner, name, parameters in (
        ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", ("parameters",)),
        (
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
            "__init__",
            ("optimizer",),
        ),
        (
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
            "__init__",
            ("optimizer", "model_chunks"),
        ),
    )
)


def _cpu_tensors_pass_cuda_type_checks():
    # Megatron recognizes fp32 / fp16 / bf16 parameters and gradients by their CUDA type names:
    # clip_grad_by_total_norm_fp32 (looked up in optimizer.py) asserts
    # `grad.type() == 'torch.cuda.FloatTensor'`; the constructors of the mixed-precision
    # optimizer (Float16OptimizerWithFloat16Params, bf16 / fp16) and of the DistributedOptimizer
    # sort parameters by 'torch.cuda.{Float,Half,BFloat16}Tensor' and reject any other type. The
    # same tensors on CPU are 'torch.FloatTensor', ...; while these run, they are named as on GPU.
    for patch in _CUDA_TYPE_CHECKS:
        patch.wrap(_with_cpu_tensor_types_named_as_cuda)


_ONE_CPU_DEVICE_PER_PROCESS = _torch_views(
    "one CPU device per process", ("megatron.training.initialize",)
)


def _one_cpu_device_per_process():
    # initialize_megatron only sets up model parallelism and the RNG tracker
    # (`_set_random_seed` -> `model_parallel_cuda_manual_seed`) if torch.cuda.device_count() > 0,
    # and then selects the device with torch.cuda.set_device(local_rank). On CPU each process has
    # one device, its CPU, which needs no selecting (torch.cpu: device_count() == 1, set_device
    # a no-op).
    (patch,) = _ONE_CPU_DEVICE_PER_PROCESS
    _override_torch_in(
        patch, cuda=dict(device_count=torch.cpu.device_count, set_device=torch.cpu.set_device)
    )


_PRETRAIN_WITHOUT_CUDA = MegatronPatch(
    "CPU platform: pretrain initializes Megatron without CUDA",
    "megatron.training.training",
    "initialize_megatron",
    ("allow_no_cuda",),
)


def _pretrain_allows_no_cuda():
    # pretrain() calls initialize_megatron(), which asserts torch.cuda.is_available() unless it
    # is called with allow_no_cuda=True.
    _PRETRAIN_WITHOUT_CUDA.wrap(
        lambda initialize_megatron: functools.partial(initialize_megatron, allow_no_cuda=True)
    )


_NO_GPU_ARCHITECTURE = MegatronPatch(
    "CPU platform: no GPU architecture",
    "megatron.training.arguments",
    "get_device_arch_version",
    (),
)


def _no_gpu_architecture():
    # validate_args() asks get_device_arch_version() (CUDA device properties; raises without a
    # GPU) whether the device is Blackwell or newer when TP or CP > 1. There is no GPU
    # architecture: 0.
    _NO_GPU_ARCHITECTURE.replace(lambda: 0)


_JIT_WARMUP = MegatronPatch(
    "CPU platform: the JIT warm-up leaves the weights' generator alone",
    "megatron.training.initialize",
    "_warmup_jit_function",
    (),
)


def _jit_warmup_leaves_the_weights_generator_alone():
    # initialize_megatron warms up the fused functions on random tensors sized by the TP and SP
    # settings, drawn from "the CUDA generator", which on CPU is the generator the weights are
    # initialised from next (use_cpu_initialization): the starting weights would then depend on
    # the parallel layout. On GPU the warm-up draws from the GPU's generator and leaves them
    # alone; on CPU it runs with the CPU generator's state saved and restored.
    def without_consuming_random_numbers(warmup):
        @functools.wraps(warmup)
        def warmup_without_consuming_random_numbers(*args, **kwargs):
            with torch.random.fork_rng(devices=[]):
                return warmup(*args, **kwargs)

        return warmup_without_consuming_random_numbers

    _JIT_WARMUP.wrap(without_consuming_random_numbers)


_PATCHES = (
    _cpu_is_the_current_device,
    _cpu_is_where_cuda_moves_to,
    _cuda_literals_on_cpu,
    _cpu_generator_is_the_cuda_generator,
    _one_cpu_stream,
    _ordered_cpu_streams_and_events,
    _record_stream_is_a_no_op_for_cpu_tensors,
    _split_sizes_are_host_arrays,
    _cpu_tensors_pass_cuda_type_checks,
    _one_cpu_device_per_process,
    _pretrain_allows_no_cuda,
    _no_gpu_architecture,
    _jit_warmup_leaves_the_weights_generator_alone,
)

# Every name the CPU platform replaces, checked before the first is replaced.
CPU_PLATFORM_PATCHES = (
    *_CURRENT_DEVICE,
    *_CUDA_MOVES_TO_CPU,
    *_CUDA_LITERALS,
    *_CPU_GENERATOR_IS_THE_CUDA_GENERATOR,
    *_ONE_CPU_STREAM,
    *_ORDERED_CPU_STREAMS,
    _RECORD_STREAM,
    _SPLIT_SIZES,
    *_CUDA_TYPE_CHECKS,
    *_ONE_CPU_DEVICE_PER_PROCESS,
    _PRETRAIN_WITHOUT_CUDA,
    _NO_GPU_ARCHITECTURE,
    _JIT_WARMUP,
)
