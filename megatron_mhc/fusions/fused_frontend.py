"""What every fused backend does around its kernels, written once.

A fused backend package (`megatron_mhc.fusions.triton`, `.cutile`) is
`FusedOps(name, load_ops, unavailable_reason).export(globals())`: the reference's functions
under the same names and signatures, the reference itself for float64 (gradcheck) and empty
inputs, shape checks with errors naming the backend, gates broadcast over the tokens as the
reference broadcasts them, `sinkhorn` and `hc_static_mappings` as the reference's, `hc_mappings`
(not fused) as the reference saving only its inputs, `is_available()`, `UNAVAILABLE_REASON` and
`SAVES_INPUTS_ONLY`. The mappings (alone, or with the collapse), the collapse, the update and the
head are the same autograd Functions for every backend (`Mappings`, `Collapse`, `Update`,
`Head`), over the backend's launchers (`ops.proj_rms_fwd/proj_rms_bwd/mhc_gates_fwd/
mhc_gates_bwd/collapse_fwd/collapse_bwd/update_fwd/update_bwd/head_fwd/head_gate_bwd`, the same
signatures in every backend) and its `ops.check_device`. The launchers allocate their outputs
with the helpers here (`*_outputs`) and size their tiles with `pow2`/`clamp_pow2`/`stream_tile`.
`SaveInputsOnly` runs an autograd-based op keeping only its inputs for backward (the HC modules
use it for the reference ops, the fused backends for `hc_mappings`), which lets the recompute
manager free and restore the stream input.
"""

import functools
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
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs, strict=True)
            if g is not None and o.requires_grad
        ]
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


# ----------------------------------------------------------------------------------------------
# What the launchers of every backend share: tile arithmetic, the device check, their outputs.
# ----------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def clamp_pow2(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, pow2(max(int(value), 1))))


def stream_tile(n: int) -> int:
    """The stream axis of a tile (NP): n rounded up to a power of two, at least 2."""
    return max(2, pow2(n))


def num_sms(device: torch.device) -> int:
    """The multiprocessors of device; off CUDA (kernels run on CPU for tests), an H100's 132, so
    that the GPU tile sizes and token splits are the ones a GPU run takes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def require_cuda(backend: str, cpu_advice: str, tensors) -> None:
    for t in tensors:
        if t.device.type != "cuda":
            raise RuntimeError(
                f"mhc_kernel_backend={backend!r} needs CUDA tensors (got a tensor on "
                f"{t.device}); {cpu_advice}"
            )


def _f32(device, *shape) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=torch.float32)


def proj_rms_fwd_outputs(x2: torch.Tensor, M: int):
    """mn [T, M] and r [T], fp32."""
    T = x2.shape[0]
    return _f32(x2.device, T, M), _f32(x2.device, T)


def gates_fwd_outputs(mn: torch.Tensor, n: int):
    """h_pre [T, n], h_post [T, n], comb [T, n, n], fp32."""
    T = mn.shape[0]
    return _f32(mn.device, T, n), _f32(mn.device, T, n), _f32(mn.device, T, n, n)


def gates_bwd_outputs(mn: torch.Tensor, programs: int):
    """g [T, M], coef [T], and the per-program partial sums of dbase [programs, M] and dscale
    [programs, 3], fp32 (added by `summed`: a deterministic reduction)."""
    T, M = mn.shape
    dev = mn.device
    return _f32(dev, T, M), _f32(dev, T), _f32(dev, programs, M), _f32(dev, programs, 3)


def head_gate_bwd_outputs(x3: torch.Tensor, programs: int):
    """g [T, n], coef [T], partial dbase [programs, n] and dscale [programs], fp32."""
    T, n = x3.shape[:2]
    dev = x3.device
    return _f32(dev, T, n), _f32(dev, T), _f32(dev, programs, n), _f32(dev, programs)


def summed(g, coef, dbase, dscale):
    """The gate backward's outputs with its per-program partials added (dscale keeps a dim)."""
    return g, coef, dbase.sum(dim=0), dscale.sum(dim=0).reshape(-1)


def collapse_bwd_outputs(x3: torch.Tensor, need_dx: bool, dx_dtype, dh_dtype):
    """dx [T, n, C] in dx_dtype (None unless need_dx) and dh [T, n] in dh_dtype."""
    T, n, C = x3.shape
    dx = torch.empty(T, n, C, device=x3.device, dtype=dx_dtype) if need_dx else None
    return dx, torch.empty(T, n, device=x3.device, dtype=dh_dtype)


def update_bwd_outputs(x3: torch.Tensor, dtypes):
    """dx [T, n, C], dy [T, C], dh_post [T, n], dcomb [T, n, n] in the inputs' dtypes."""
    T, n, C = x3.shape
    shapes = ((T, n, C), (T, C), (T, n), (T, n, n))
    return [torch.empty(s, device=x3.device, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]


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
