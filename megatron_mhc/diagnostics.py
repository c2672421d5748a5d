"""mHC health figures: mean H_pre, mean H_post and the Amax gain of the residual mixing.

As docs/math.md defines them: for the composite residual mapping P = H_res(L) @ ... @ H_res(l)
of each token (H_res = comb transposed), the forward gain is the largest |row sum| of P and the
backward gain the largest |column sum|; both are averaged over the tokens of a batch. mHC keeps
them near 1; unconstrained hyper-connections can reach thousands.

`MHCHealthMonitor` observes the HC modules of the model chunks it watches with forward hooks.
While recording (`recording()`, or `start()` ... `stop()`) it keeps the mappings of the first
forward pass of each module (the first micro-batch; later micro-batches and recomputations are
ignored), and `summarize()` turns them into figures per layer and for the whole stack. With
pipeline parallelism (virtual stages included) the per-layer products are gathered over the
pipeline group and multiplied in layer order, so the stack figure spans every stage; with
sequence or context parallelism each rank summarises its token shard.
"""

import contextlib
import time

import torch
import torch.distributed as dist

from megatron_mhc.transformer.hyper_connection import HyperConnectionModule
from megatron_mhc.transformer.transformer_layer import HyperConnectionTransformerLayer


def mean_mapping_figures(prefix: str, mappings: torch.Tensor) -> dict[str, float]:
    """The token-averaged mapping of per-token mappings [..., n, n] as `{prefix}/i_j` figures."""
    mean = mappings.reshape(-1, *mappings.shape[-2:]).mean(dim=0).tolist()
    return {f"{prefix}/{i}_{j}": value for i, row in enumerate(mean) for j, value in enumerate(row)}


def amax_gains(composite: torch.Tensor):
    """(forward, backward) Amax gain of per-token mappings [..., n, n], averaged over tokens."""
    forward = composite.sum(dim=-1).abs().amax(dim=-1).mean()
    backward = composite.sum(dim=-2).abs().amax(dim=-1).mean()
    return forward.item(), backward.item()


class MHCHealthMonitor:
    """Collects the HC mappings of the model chunks it watches (a model, or the virtual
    pipeline chunks of this rank)."""

    def __init__(self, model_chunks=()):
        self._records: dict[tuple, tuple] = {}
        self._recording = False
        # Wall time the hooks spent recording since `start()`: part of the cost of the figures.
        self.seconds = 0.0
        self._layers: list[HyperConnectionTransformerLayer] = []
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        for chunk in chunks:
            self.watch(chunk)

    def watch(self, model: torch.nn.Module) -> None:
        """Observe the mHC layers of `model` too."""
        for module in model.modules():
            # An MTP layer's streams branch off the stack after its last layer: not part of the
            # stack's composite mapping, and numbered from 1 again.
            if isinstance(module, HyperConnectionTransformerLayer) and not module.is_mtp_layer:
                self._layers.append(module)
                for position, hyper_connection in enumerate(module.hyper_connections):
                    key = (module.layer_number, position)
                    hyper_connection.register_forward_hook(self._hook(key))
        self._layers.sort(key=lambda layer: layer.layer_number)

    @property
    def is_recording(self) -> bool:
        return self._recording

    def start(self) -> None:
        """Forget earlier records and record the first forward pass of each module from now."""
        self._records = {}
        self._recording = True
        self.seconds = 0.0

    def stop(self) -> None:
        self._recording = False

    def _hook(self, key):
        def record(_module: HyperConnectionModule, _inputs, outputs):
            if self._recording and key not in self._records:
                began = time.perf_counter()
                h_pre, h_post, comb = (
                    t.detach().float() for t in (outputs.h_pre, outputs.h_post, outputs.comb)
                )
                h_res = comb.transpose(-1, -2).reshape(-1, *comb.shape[-2:])
                self._records[key] = (h_pre.mean().item(), h_post.mean().item(), h_res)
                self.seconds += time.perf_counter() - began

        return record

    @contextlib.contextmanager
    def recording(self):
        """Record the mappings of the forward passes run inside (their first pass each)."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def summarize(self, pp_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Figures per layer (`mhc/layerNN/...`) and for the stack (`mhc/...`).

        Besides the means and gains, the token-averaged H_res of each layer (its sublayers'
        mixings composed) is `mhc/layerNN/h_res/i_j` (row i, column j) and that of the composite
        over the stack `mhc/h_res/i_j`.

        Collective over `pp_group` when it has more than one rank: call it on every rank of the
        pipeline group at the same point. Empty when nothing was recorded.
        """
        local = {}
        for layer in self._layers:
            records = [
                self._records.get((layer.layer_number, position))
                for position in range(len(layer.hyper_connections))
            ]
            if all(record is not None for record in records):
                # H_res of the layer: its sublayers' mixings applied in forward order.
                product = records[0][2]
                for record in records[1:]:
                    product = record[2] @ product
                local[layer.layer_number] = (
                    [r[0] for r in records],
                    [r[1] for r in records],
                    product.cpu(),
                )
        per_layer = local
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            gathered = [None] * dist.get_world_size(pp_group)
            dist.all_gather_object(gathered, local, group=pp_group)
            per_layer = {k: v for stage in gathered for k, v in stage.items()}
        figures: dict[str, float] = {}
        product = None
        for layer_number in sorted(per_layer):
            h_pre, h_post, layer_product = per_layer[layer_number]
            prefix = f"mhc/layer{layer_number:02d}"
            figures[f"{prefix}/h_pre_mean"] = sum(h_pre) / len(h_pre)
            figures[f"{prefix}/h_post_mean"] = sum(h_post) / len(h_post)
            figures[f"{prefix}/amax_gain_fwd"], figures[f"{prefix}/amax_gain_bwd"] = amax_gains(
                layer_product
            )
            figures.update(mean_mapping_figures(f"{prefix}/h_res", layer_product))
            product = layer_product if product is None else layer_product @ product
        if product is None:
            return figures
        h_pre = [value for v in per_layer.values() for value in v[0]]
        h_post = [value for v in per_layer.values() for value in v[1]]
        figures["mhc/h_pre_mean"] = sum(h_pre) / len(h_pre)
        figures["mhc/h_post_mean"] = sum(h_post) / len(h_post)
        figures["mhc/amax_gain_fwd"], figures["mhc/amax_gain_bwd"] = amax_gains(product)
        figures.update(mean_mapping_figures("mhc/h_res", product))
        return figures
