"""CUDA streams and events on CPU, and the host copies Megatron makes on them.

DDP's side stream becomes torch.cpu's device-agnostic single stream. The streams and events of
the combined 1F1B schedule (``overlap_moe_expert_parallel_comm``), of the ``alltoall`` MoE token
dispatcher and of the mHC MLP update's high-priority stream become ordered no-ops: the CPU runs
every op when it is issued, so the order of operations is the order in which the schedule issues
them on GPU, and every event is complete when it is recorded. ``Tensor.record_stream`` (replaced
on torch itself: called from too many places to list) is a no-op for CPU tensors, and the
dispatcher's split sizes become the host arrays it makes of them on GPU. (``delay_wgrad_compute``
runs too: the local spec's linears, which have no deferred weight-gradient pass, compute their
weight gradients in the ordinary backward.)
"""

import functools

import torch

from megatron_mhc.megatron_patches import MegatronPatch
from megatron_mhc.platform.cpu.module_views import override_torch_in, torch_views

__all__ = ["STREAM_PATCHES", "apply_stream_patches"]

# Megatron modules that use CUDA streams on the code paths of a CPU run: training.py builds DDP on
# a side stream; the DDP gradient buffers wait on the current stream before reducing.
_ONE_CPU_STREAM = torch_views(
    "one CPU stream",
    ("megatron.core.distributed.param_and_grad_buffer", "megatron.training.training"),
)


def _one_cpu_stream():
    # torch.cuda.Stream / current_stream / stream raise without a GPU. The CPU runs one stream,
    # for which torch.cpu has device-agnostic Stream / current_stream / stream (all no-ops).
    for patch in _ONE_CPU_STREAM:
        override_torch_in(
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
_ORDERED_CPU_STREAMS = torch_views(
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
        override_torch_in(
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


STREAM_PATCHES = (*_ONE_CPU_STREAM, *_ORDERED_CPU_STREAMS, _RECORD_STREAM, _SPLIT_SIZES)


def apply_stream_patches() -> None:
    """Make STREAM_PATCHES (checked by the caller)."""
    _one_cpu_stream()
    _ordered_cpu_streams_and_events()
    _record_stream_is_a_no_op_for_cpu_tensors()
    _split_sizes_are_host_arrays()
