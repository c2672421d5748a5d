"""What every fused backend does around its kernels, written once.

A fused backend (`megatron_mhc.fusions.triton`, `.cutile`) exposes `FusedOps(name, load_ops)`'s
methods as its public functions: the reference's names and signatures, the reference itself for
float64 (gradcheck) and empty inputs, shape checks with errors naming the backend, and gates
broadcast over the tokens as the reference broadcasts them. The mappings (alone, or with the
collapse), the collapse and the update are the same autograd Functions for every backend
(`Mappings`, `Collapse`, `Update`), over the backend's launchers
(`ops.proj_rms_fwd/proj_rms_bwd/mhc_gates_fwd/mhc_gates_bwd/collapse_fwd/collapse_bwd/
update_fwd/update_bwd`) and its `ops.check_device`; the head is the backend's own `ops.Head`.
`SaveInputsOnly` runs an autograd-based op keeping only its inputs for backward (the HC modules
use it for the reference ops, the fused backends for the ops they do not fuse), which lets the
recompute manager free and restore the stream input.
"""

import math

import torch

from megatron_mhc.fusions import reference


class SaveInputsOnly(torch.autograd.Function):
    """op(*inputs) keeping only the inputs for backward, where op is rerun with grad."""

    @staticmethod
    def forward(ctx, op, *inputs):
        ctx.op = op
        ctx.save_for_backward(*inputs)
        return op(*inputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.op(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else ()
        )
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def tokens(x: torch.Tensor, trailing: int) -> int:
    """Number of tokens of x: the product of its leading dims."""
    return math.prod(x.shape[: x.dim() - trailing])


def rows(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """t as a contiguous [*shape] tensor (a view when it already is one)."""
    return t.reshape(*shape).contiguous()


class Mappings(torch.autograd.Function):
    """mhc_mappings, or (with_collapse) mhc_mappings_collapse, with the launchers of `ops`.

    Forward: one pass over x for the projection and the sum of squares (`proj_rms_fwd`), the
    gates and Sinkhorn per token (`mhc_gates_fwd`), and with the collapse one more pass
    (`collapse_fwd`: h_pre needs the whole projection first). Saves the inputs as given plus the
    small fp32 mn [T, M], r [T] (and h_pre [T, n]).

    Backward with the collapse: dh_pre = <x_i, du> (`collapse_bwd`, x read, no dx written), the
    gates and Sinkhorn backward (`mhc_gates_bwd`), then one pass over x (`proj_rms_bwd`) that
    writes dx = g @ fn + coef * x + h_pre[i] * du + d(residual): the update's gradient of x
    arrives through the returned `residual` (x itself), so dx is written once and autograd adds
    no n-stream gradients.
    """

    @staticmethod
    def forward(ctx, ops, with_collapse, x, fn, base, scale, iters, eps, norm_eps):
        ctx.set_materialize_grads(False)
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        ops.check_device(x, fn, base, scale)
        x3 = rows(x, T, n, C)
        mn, r = ops.proj_rms_fwd(x3.view(T, n * C), fn.contiguous(), norm_eps)
        h_pre, h_post, comb = ops.mhc_gates_fwd(
            mn, base.contiguous(), rows(scale, -1), n, iters, eps
        )
        ctx.ops, ctx.with_collapse, ctx.iters, ctx.eps = ops, with_collapse, iters, eps
        lead = x.shape[:-2]
        maps = (h_pre.view(*lead, n), h_post.view(*lead, n), comb.view(*lead, n, n))
        if not with_collapse:
            ctx.save_for_backward(x, fn, base, scale, mn, r)
            return maps
        u = ops.collapse_fwd(x3, h_pre, x.dtype)
        ctx.save_for_backward(x, fn, base, scale, mn, r, h_pre)
        return (u.view(*lead, C), *maps, x)

    @staticmethod
    def backward(ctx, *grads):
        ops = ctx.ops
        x, fn, base, scale, mn, r = ctx.saved_tensors[:6]
        n, C = x.shape[-2:]
        T, K = tokens(x, 2), n * C
        x3 = rows(x, T, n, C)
        du = collapse = residual = None
        if ctx.with_collapse:
            du, dh_pre, dh_post, dcomb, dresidual = grads
            h_pre = ctx.saved_tensors[6]
            if du is not None:
                du = rows(du, T, C)
                collapse = (h_pre, du, C)
                _, dh_u = ops.collapse_bwd(x3, h_pre, du, False, x.dtype, torch.float32)
                dh_pre = dh_u if dh_pre is None else dh_u + rows(dh_pre, T, n)
            if dresidual is not None:
                residual = rows(dresidual, T, K)
        else:
            dh_pre, dh_post, dcomb = grads

        def grad_or_zeros(g, *shape):
            return rows(g, *shape) if g is not None else mn.new_zeros(shape)

        g, coef, dbase, dscale = ops.mhc_gates_bwd(
            mn,
            r,
            base.contiguous(),
            rows(scale, -1),
            grad_or_zeros(dh_pre, T, n),
            grad_or_zeros(dh_post, T, n),
            grad_or_zeros(dcomb, T, n, n),
            n,
            K,
            ctx.iters,
            ctx.eps,
        )
        need_dx, need_dfn = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dx = dfn = None
        if need_dx or need_dfn:
            dx, dfn = ops.proj_rms_bwd(
                x3.view(T, K),
                fn.contiguous(),
                g,
                coef,
                need_dx,
                need_dfn,
                x.dtype,
                collapse=collapse,
                residual=residual,
            )
        return (
            None,
            None,
            dx.view(x.shape) if dx is not None else None,
            dfn.to(fn.dtype) if dfn is not None else None,
            dbase.to(base.dtype),
            dscale.view(scale.shape).to(scale.dtype),
            None,
            None,
            None,
        )


class Collapse(torch.autograd.Function):
    """u = sum_i h_pre[i] x_i with the launchers of `ops`; saves its inputs only."""

    @staticmethod
    def forward(ctx, ops, x, h_pre):
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        ops.check_device(x, h_pre)
        out = ops.collapse_fwd(rows(x, T, n, C), rows(h_pre, T, n), x.dtype)
        ctx.ops = ops
        ctx.save_for_backward(x, h_pre)
        return out.view(*x.shape[:-2], C)

    @staticmethod
    def backward(ctx, du):
        x, h_pre = ctx.saved_tensors
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        dx, dh = ctx.ops.collapse_bwd(
            rows(x, T, n, C),
            rows(h_pre, T, n),
            rows(du, T, C),
            ctx.needs_input_grad[1],
            x.dtype,
            h_pre.dtype,
        )
        return None, (dx.view(x.shape) if dx is not None else None), dh.view(h_pre.shape)


class Update(torch.autograd.Function):
    """x'_k = h_post[k] y + sum_j comb[j, k] x_j with the launchers of `ops`; saves its inputs."""

    @staticmethod
    def forward(ctx, ops, x, y, h_post, comb):
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        ops.check_device(x, y, h_post, comb)
        out = ops.update_fwd(
            rows(x, T, n, C), rows(y, T, C), rows(h_post, T, n), rows(comb, T, n, n)
        )
        ctx.ops = ops
        ctx.save_for_backward(x, y, h_post, comb)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x, y, h_post, comb = ctx.saved_tensors
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        dx, dy, dh, dcomb = ctx.ops.update_bwd(
            rows(x, T, n, C),
            rows(y, T, C),
            rows(h_post, T, n),
            rows(comb, T, n, n),
            rows(dout, T, n, C),
            (x.dtype, y.dtype, h_post.dtype, comb.dtype),
        )
        return (
            None,
            dx.view(x.shape),
            dy.view(y.shape),
            dh.view(h_post.shape),
            dcomb.view(comb.shape),
        )


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
    with the package and could go stale)."""

    # What a backend package exports: the reference's functions plus its availability.
    EXPORTS = [*reference.__all__, "is_available", "UNAVAILABLE_REASON", "SAVES_INPUTS_ONLY"]

    def __init__(self, backend: str, load_ops, unavailable_reason=lambda: None):
        self.backend, self._load_ops = backend, load_ops
        self._unavailable_reason = unavailable_reason

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
        return self._load_ops().Head.apply(x, fn, base, scale, float(eps), float(norm_eps))
