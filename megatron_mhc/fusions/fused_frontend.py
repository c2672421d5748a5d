"""The public ops of a fused backend, written once: `FusedOps`.

A fused backend package (`megatron_mhc.fusions.triton`, `.cutile`) is
`FusedOps(name, load_ops, unavailable_reason).export(globals())`: the reference's functions
under the same names and signatures, the reference itself for float64 (gradcheck) and empty
inputs, shape checks with errors naming the backend, gates broadcast over the tokens as the
reference broadcasts them, `sinkhorn` and `hc_static_mappings` as the reference's, `hc_mappings`
(not fused) as the reference saving only its inputs, `is_available()`, `UNAVAILABLE_REASON` and
`SAVES_INPUTS_ONLY`. The fused ops are the autograd Functions of `fused_functions.py` over the
backend's launchers.
"""

import functools

import torch

from megatron_mhc.fusions import reference
from megatron_mhc.fusions.fused_functions import Collapse, Head, Mappings, Update
from megatron_mhc.fusions.save_inputs_only import SaveInputsOnly


def hc_mappings(x, fn, base, scale, norm_eps: float = 1e-6):
    """The reference `hc_mappings` (no backend fuses it), saving only its inputs for backward."""
    op = functools.partial(reference.hc_mappings, norm_eps=norm_eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, fn, base, scale)):
        return SaveInputsOnly.apply(op, x, fn, base, scale)
    return op(x, fn, base, scale)


def use_reference(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 or t.numel() == 0 for t in tensors)


def lead_shape(*pairs):
    """Broadcast leading shape of (tensor, number of trailing dims) pairs."""
    return torch.broadcast_shapes(*(t.shape[: t.dim() - k] for t, k in pairs))


def expand(t: torch.Tensor, lead, trailing: int) -> torch.Tensor:
    """t broadcast to [*lead, *t.shape[-trailing:]] (a view; autograd sums its grad back)."""
    target = (*lead, *t.shape[t.dim() - trailing :])
    return t if t.shape == target else t.expand(target)


class FusedOps:
    """The public ops of a fused backend: the reference's names, signatures and contracts, over
    the backend's launchers. `load_ops()` returns the backend's `ops` module (imported at the
    first call, so that importing a backend package imports neither triton nor cuda.tile).
    Float64 (gradcheck) and empty inputs go to the reference; shapes are checked with errors
    naming the backend; gates are broadcast over the tokens as the reference broadcasts them.

    `unavailable_reason()` is None when the kernels can run here, else why not; it gives the
    package's `is_available()` and its `UNAVAILABLE_REASON` (through `module_getattr`, the
    package's `__getattr__`: computed when read, as a constant would import triton or cuda.tile
    with the package and could go stale). `export(namespace)` makes a package of it."""

    # What a backend package exports: the reference's functions plus its availability.
    EXPORTS = [*reference.__all__, "is_available", "UNAVAILABLE_REASON", "SAVES_INPUTS_ONLY"]

    def __init__(self, backend: str, load_ops, unavailable_reason=lambda: None):
        self.backend, self._load_ops = backend, load_ops
        self._unavailable_reason = unavailable_reason

    def export(self, namespace: dict) -> None:
        """Defines the backend package's public names in its module namespace (`globals()`):
        the fused ops, the reference's `sinkhorn` and `hc_static_mappings`, the input-saving
        `hc_mappings`, `is_available`, `__getattr__` (for `UNAVAILABLE_REASON`), `__all__` and
        `SAVES_INPUTS_ONLY`: every Function saves only its inputs plus small per-token tensors
        and reads them only when backward runs (the recompute manager frees and restores x)."""
        namespace.update(
            __all__=self.EXPORTS,
            __getattr__=self.module_getattr,
            SAVES_INPUTS_ONLY=True,
            is_available=self.is_available,
            sinkhorn=reference.sinkhorn,
            hc_static_mappings=reference.hc_static_mappings,
            hc_mappings=hc_mappings,
            mhc_mappings=self.mhc_mappings,
            mhc_mappings_collapse=self.mhc_mappings_collapse,
            mhc_collapse=self.mhc_collapse,
            mhc_update=self.mhc_update,
            mhc_head=self.mhc_head,
        )

    def is_available(self) -> bool:
        """True when this backend's kernels can run here."""
        return self._unavailable_reason() is None

    def module_getattr(self, name: str):
        if name == "UNAVAILABLE_REASON":
            return self._unavailable_reason() or ""
        raise AttributeError(
            f"module 'megatron_mhc.fusions.{self.backend}' has no attribute {name!r}"
        )

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{self.backend} backend: {what}")

    def mhc_mappings(
        self,
        x,
        fn,
        base,
        scale,
        sinkhorn_iters: int = 20,
        eps: float = 1e-6,
        norm_eps: float = 1e-6,
    ):
        """mHC mappings of x [..., n, C] -> (h_pre, h_post, comb), fp32."""
        return self._mappings(False, x, fn, base, scale, sinkhorn_iters, eps, norm_eps)

    def mhc_mappings_collapse(
        self,
        x,
        fn,
        base,
        scale,
        sinkhorn_iters: int = 20,
        eps: float = 1e-6,
        norm_eps: float = 1e-6,
    ):
        """(u, h_pre, h_post, comb, residual) from one Function whose backward writes dx once."""
        return self._mappings(True, x, fn, base, scale, sinkhorn_iters, eps, norm_eps)

    def _mappings(self, with_collapse, x, fn, base, scale, sinkhorn_iters, eps, norm_eps):
        if use_reference(x, fn, base, scale):
            op = reference.mhc_mappings_collapse if with_collapse else reference.mhc_mappings
            return op(x, fn, base, scale, sinkhorn_iters, eps, norm_eps)
        n, C = x.shape[-2:]
        num_maps = n * n + 2 * n
        self._check(
            tuple(fn.shape) == (num_maps, n * C),
            f"fn must be [{num_maps}, {n * C}], got {tuple(fn.shape)}",
        )
        self._check(
            tuple(base.shape) == (num_maps,), f"base must be [{num_maps}], got {tuple(base.shape)}"
        )
        self._check(
            scale.numel() == 3, f"scale must hold 3 gating factors, got {tuple(scale.shape)}"
        )
        return Mappings.apply(
            self._load_ops(),
            with_collapse,
            x,
            fn,
            base,
            scale,
            int(sinkhorn_iters),
            float(eps),
            float(norm_eps),
        )

    def mhc_collapse(self, x, h_pre):
        """u = sum_i h_pre[i] * x_i: [..., n, C], [..., n] -> [..., C] in x.dtype."""
        if use_reference(x, h_pre):
            return reference.mhc_collapse(x, h_pre)
        self._check(
            h_pre.shape[-1] == x.shape[-2],
            f"h_pre {tuple(h_pre.shape)} does not "
            f"match the {x.shape[-2]} streams of x {tuple(x.shape)}",
        )
        lead = lead_shape((x, 2), (h_pre, 1))
        return Collapse.apply(self._load_ops(), expand(x, lead, 2), expand(h_pre, lead, 1))

    def mhc_update(self, x, y, h_post, comb):
        """x'_k = h_post[k] * y + sum_j comb[j, k] * x_j -> [..., n, C] in x.dtype."""
        if use_reference(x, y, h_post, comb):
            return reference.mhc_update(x, y, h_post, comb)
        n, C = x.shape[-2:]
        self._check(
            y.shape[-1] == C and h_post.shape[-1] == n and tuple(comb.shape[-2:]) == (n, n),
            f"shapes do not match: x {tuple(x.shape)}, y {tuple(y.shape)}, "
            f"h_post {tuple(h_post.shape)}, comb {tuple(comb.shape)}",
        )
        lead = lead_shape((x, 2), (y, 1), (h_post, 1), (comb, 2))
        return Update.apply(
            self._load_ops(),
            expand(x, lead, 2),
            expand(y, lead, 1),
            expand(h_post, lead, 1),
            expand(comb, lead, 2),
        )

    def mhc_head(self, x, fn, base, scale, eps: float = 1e-6, norm_eps: float = 1e-6):
        """Learned contract (DeepSeek-V4 head): sum_i w_i x_i, w = sigmoid(scale*m + base) + eps."""
        if use_reference(x, fn, base, scale):
            return reference.mhc_head(x, fn, base, scale, eps, norm_eps)
        n, C = x.shape[-2:]
        self._check(
            tuple(fn.shape) == (n, n * C), f"fn must be [{n}, {n * C}], got {tuple(fn.shape)}"
        )
        self._check(tuple(base.shape) == (n,), f"base must be [{n}], got {tuple(base.shape)}")
        self._check(
            scale.numel() == 1, f"scale must hold 1 gating factor, got {tuple(scale.shape)}"
        )
        return Head.apply(self._load_ops(), x, fn, base, scale, float(eps), float(norm_eps))
