"""The autograd Functions of the fused mHC ops, the same for every fused backend.

`Mappings` (alone, or with the collapse), `Collapse`, `Update` and `Head` run over the launchers
of the backend they are given (`ops.proj_rms_fwd/proj_rms_bwd/mhc_gates_fwd/mhc_gates_bwd/
collapse_fwd/collapse_bwd/update_fwd/update_bwd/head_fwd/head_gate_bwd`, the same signatures in
every backend) and its `ops.check_device`. Each saves its inputs as given plus small fp32
per-token tensors, and reshapes them only in backward (the recompute manager frees and restores
the stream input in between).
"""

import math

import torch


def tokens(x: torch.Tensor, trailing: int) -> int:
    """Number of tokens of x: the product of its leading dims."""
    return math.prod(x.shape[: x.dim() - trailing])


def rows(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """t as a contiguous [*shape] tensor (a view when it already is one)."""
    return t.reshape(*shape).contiguous()


def _projection_backward(ctx, x_index, x3, fn, g, coef, collapse=None, residual=None):
    """(dx, dfn) of the projection from g and coef (`ops.proj_rms_bwd`, one pass over x), each
    None unless the Function's inputs x (at x_index) and fn (next) need it."""
    need_dx, need_dfn = ctx.needs_input_grad[x_index : x_index + 2]
    if not (need_dx or need_dfn):
        return None, None
    T, n, C = x3.shape
    return ctx.ops.proj_rms_bwd(
        x3.view(T, n * C),
        fn.contiguous(),
        g,
        coef,
        need_dx,
        need_dfn,
        x3.dtype,
        collapse=collapse,
        residual=residual,
    )


def _parameter_grads(x, fn, base, scale, dx, dfn, dbase, dscale):
    """The gradients of (x, fn, base, scale) in their shapes and dtypes (dx, dfn may be None)."""
    return (
        dx.view(x.shape) if dx is not None else None,
        dfn.view(fn.shape).to(fn.dtype) if dfn is not None else None,
        dbase.to(base.dtype),
        dscale.view(scale.shape).to(scale.dtype),
    )


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
        dx, dfn = _projection_backward(ctx, 2, x3, fn, g, coef, collapse, residual)
        return (
            None,
            None,
            *_parameter_grads(x, fn, base, scale, dx, dfn, dbase, dscale),
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


class Head(torch.autograd.Function):
    """The learned head u = sum_i w_i x_i, w = sigmoid(scale * mn + base) + eps, with the
    launchers of `ops`. Forward: `head_fwd` (the projection and the weights, then u: two passes
    over x); saves the inputs as given plus the small fp32 mn [T, n], r [T] and w [T, n].
    Backward: `head_gate_bwd` (dw_i = <x_i, du> and the gate backward, one pass over x), then
    `proj_rms_bwd` with M = n and the collapse term w_i du (one pass over x)."""

    @staticmethod
    def forward(ctx, ops, x, fn, base, scale, eps, norm_eps):
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        ops.check_device(x, fn, base, scale)
        out, mn, r, w = ops.head_fwd(
            rows(x, T, n, C), fn.contiguous(), base.contiguous(), rows(scale, 1), eps, norm_eps
        )
        ctx.ops = ops
        ctx.save_for_backward(x, fn, base, scale, mn, r, w)
        return out.view(*x.shape[:-2], C)

    @staticmethod
    def backward(ctx, du):
        x, fn, base, scale, mn, r, w = ctx.saved_tensors
        n, C = x.shape[-2:]
        T = tokens(x, 2)
        x3, du2 = rows(x, T, n, C), rows(du, T, C)
        g, coef, dbase, dscale = ctx.ops.head_gate_bwd(
            x3, du2, mn, r, base.contiguous(), rows(scale, 1)
        )
        dx, dfn = _projection_backward(ctx, 1, x3, fn, g, coef, collapse=(w, du2, C))
        return (None, *_parameter_grads(x, fn, base, scale, dx, dfn, dbase, dscale), None, None)
