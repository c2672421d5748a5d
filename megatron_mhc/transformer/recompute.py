"""MHCRecomputeManager: discard the n-stream states inside each block of L_r layers.

The n-stream residual makes every HC module keep an [s, b, n*C] input for backward (its
mappings, collapse and update all read it). Following the mHC paper, the manager keeps only the
stream state entering each block of L_r consecutive layers of a pipeline stage: once the block's
forward is done it frees the storage of the states inside the block, and when backward reaches
the block (the gradient of its output arrives) it recomputes them in forward order with the HC
update alone, X_k = update(X_{k-1}, y_k, h_post_k, comb_k), from the block input and the
sublayer outputs and mappings the updates keep anyway (C-sized and n x n). The sublayers
(attention, MLP) are not rerun. The sublayer outputs are kept after dropout, so no dropout mask
or RNG state has to be regenerated, and the recomputed states are bitwise the forward ones.

Only training passes that build a graph are affected: eval and forward-only runs keep
everything. Blocks never cross a pipeline stage (or virtual stage): the plan is made per
TransformerBlock from the layers it holds, which hands each HC module its HCRecomputePlan when the
block is constructed.
"""

import dataclasses
import functools
import math
from collections.abc import Iterator

import torch


def recompute_block_size(
    setting: int | str | None, num_streams: int, num_layers: int
) -> int | None:
    """L_r for a stage of `num_layers` layers: `setting` itself, or eq. 20 (docs/math.md) for 'auto'
    (L_r* = max(1, floor(sqrt(n * L / (n + 2))))), or None (no recompute)."""
    if setting is None or num_layers == 0:
        return None
    if setting == "auto":
        return max(1, math.isqrt(num_streams * num_layers // (num_streams + 2)))
    return setting


class MHCRecomputeManager:
    """Frees and recomputes the stream states of `layers` (one stage), `block_size` per block.

    A block is `block_size` consecutive layers, whatever each holds: two HC modules in a GPT
    layer, one in a HybridModel layer (there one layer is one sublayer). `module_plans` gives each
    HC module of the stage its HCRecomputePlan.
    """

    def __init__(self, layers, block_size: int, ops):
        self.block_size = block_size
        self.ops = ops
        self._open_block: list[tuple] = []
        # The streams the open block's updates ran on: under the combined 1F1B schedule the
        # attention's and the MLP's updates run in different schedule nodes, on different streams.
        self._open_block_streams = set()
        self._hyper_connections = [layer.hyper_connections for layer in layers]
        # Streams other than the caller's that read the stream states (the MLP updates' with
        # mhc_mlp_high_priority_stream).
        self._side_streams = {
            hc.update_stream.stream
            for layer_hcs in self._hyper_connections
            for hc in layer_hcs
            if hc.update_stream is not None
        }

    def module_plans(self) -> Iterator[tuple[torch.nn.Module, "HCRecomputePlan"]]:
        """(HC module, its plan) for every HC module of the stage, in forward order: the last
        update of each block (the last layer of the block, or of the stage) closes it."""
        num_layers = len(self._hyper_connections)
        for index, layer_hcs in enumerate(self._hyper_connections):
            closes_block = (index + 1) % self.block_size == 0 or index + 1 == num_layers
            for hc in layer_hcs:
                yield hc, HCRecomputePlan(self, closes_block and hc is layer_hcs[-1])

    def record_update(
        self, module, streams_in, y, h_post, comb, streams_out, closes_block: bool
    ) -> None:
        """Called by every HC update of the stage with its inputs and output; `closes_block`:
        this update is the last of its block."""
        if not (module.training and torch.is_grad_enabled() and streams_out.requires_grad):
            return  # eval and forward-only passes keep everything
        self._open_block.append((streams_in, y, h_post, comb))
        if streams_out.is_cuda:
            self._open_block_streams.add(torch.cuda.current_stream(streams_out.device))
        if closes_block:
            steps, self._open_block = self._open_block, []
            streams, self._open_block_streams = self._open_block_streams, set()
            self._discard_and_register_recompute(steps, streams_out, streams)

    def _discard_and_register_recompute(self, steps, block_output, block_streams):
        # The inputs of steps 1.. are the states inside the block; step 0's is the block input.
        inner_states = [step[0] for step in steps[1:]]
        for state in inner_states:
            state.untyped_storage().resize_(0)
        # Every stream the block's forward ran on reads these states in backward.
        readers = block_streams | self._side_streams
        # The hook holds the block input and the small tensors, never the block output: the
        # pipeline schedule frees a stage output after sending it.
        block_output.register_hook(functools.partial(self._recompute, steps, readers))

    @torch.no_grad()
    def _recompute(self, steps, readers, _grad):
        state = steps[0][0]
        for (_, y, h_post, comb), (inner_state, *_rest) in zip(steps, steps[1:], strict=False):
            state = self.ops.mhc_update(state, y, h_post, comb)
            # Storage-level copy: restores the saved tensor's data without bumping its version.
            storage = inner_state.untyped_storage()
            storage.resize_(state.untyped_storage().size())
            storage.copy_(state.untyped_storage())
            # The storage now belongs to the stream this hook runs on (autograd's stream for the
            # block output's grad node); the backward nodes of other streams read it too.
            for stream in readers:
                inner_state.record_stream(stream)
            state = inner_state


@dataclasses.dataclass(frozen=True)
class HCRecomputePlan:
    """One HC module's part in its stage's recompute: the manager of the stage's blocks, and
    whether the module's update is the last of its block (where the block's forward ends)."""

    manager: MHCRecomputeManager
    closes_block: bool

    def record_update(self, module, streams_in, y, h_post, comb, streams_out) -> None:
        self.manager.record_update(
            module, streams_in, y, h_post, comb, streams_out, closes_block=self.closes_block
        )
