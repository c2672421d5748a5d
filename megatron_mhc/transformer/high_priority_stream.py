"""The MLP's HC update on a high-priority CUDA stream (`mhc_mlp_high_priority_stream`).

With pipeline or expert parallelism, NCCL kernels (P2P sends and receives, all-to-alls) run on
their own streams and hold SMs while they wait for their peers. The MLP's update writes the
stream state that the next layer, or the next pipeline stage, needs first; queued behind
communication kernels it would delay the whole critical path. On a stream of the greatest
priority the GPU's block scheduler dispatches its thread blocks ahead of those of every
lower-priority stream, so communication never delays it (the mHC paper runs these kernels on
such a stream for the same reason).

Ordering is by events, so that every kernel sees exactly the data it would see on one stream
and the results are bitwise those without the option: the high-priority stream waits for an
event recorded on the caller's stream before the update, and the caller's stream waits for an
event recorded after it. Autograd runs an op's backward on the stream its forward ran on and
synchronises the gradients with their consumers' streams, so the update's backward runs on the
high-priority stream too, with no further code.

Memory: a tensor allocated on one stream and used on another must tell the caching allocator
(`record_stream`), or its memory could be handed out again while the other stream still reads
it: the inputs are marked as used by the high-priority stream, the output as used by the
caller's stream.

On CPU the platform (megatron_mhc/platform/cpu/streams.py) gives this module its ordered CPU
streams and events: the same code runs, each op when it is issued, so the stream branch is
tested on CPU; the concurrency itself needs a GPU.
"""

import functools

import torch


class HighPriorityStream:
    """A CUDA stream of the greatest priority, and `run` to put one op on it."""

    def __init__(self, device: torch.device):
        _least, greatest = torch.cuda.Stream.priority_range()
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=greatest)

    def run(self, op, *inputs: torch.Tensor) -> torch.Tensor:
        """op(*inputs) on this stream, ordered after the caller's queued work and before its
        next work."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_event(caller.record_event())
        with torch.cuda.stream(self.stream):
            output = op(*inputs)
        caller.wait_event(self.stream.record_event())
        for tensor in inputs:
            tensor.record_stream(self.stream)
        output.record_stream(caller)
        return output


@functools.cache
def high_priority_stream(device_index: int | str) -> HighPriorityStream:
    """The one high-priority stream of a GPU, shared by every HC module on it
    (`device_index`: torch.cuda.current_device(), which the CPU platform answers with "cpu")."""
    if isinstance(device_index, str):
        return HighPriorityStream(torch.device(device_index))
    return HighPriorityStream(torch.device("cuda", device_index))


def mlp_high_priority_stream(config):
    """The stream the MLP's HC update runs on (None: the caller's stream), checked when the
    layer is built: the option needs a CUDA device, or the CPU platform's stand-in streams."""
    from megatron_mhc.platform.cpu import cpu_platform_applied

    if not config.mhc_mlp_high_priority_stream:
        return None
    if not (torch.cuda.is_available() or cpu_platform_applied()):
        raise ValueError(
            "MHCTransformerConfig.mhc_mlp_high_priority_stream=True needs a CUDA device, or on "
            "CPU the CPU platform (megatron_mhc.platform.cpu.apply_cpu_platform, which "
            "pretrain_gpt_mhc.py applies): set it to False (the default) otherwise"
        )
    return high_priority_stream(torch.cuda.current_device())
