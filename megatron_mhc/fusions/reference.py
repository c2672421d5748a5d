"""Pure-PyTorch reference of every mHC op: docs/math.md written as code.

Every fused backend (`megatron_mhc.fusions.<backend>`) exposes these functions under the same
names and signatures, and every kernel test compares against them. They run anywhere torch runs,
differentiate through autograd, and compute in fp32 whatever the input dtype (in float64 when an
input is float64: gradcheck and exactness tests): the mappings are returned in that compute
dtype; collapse, update and head return the dtype of the stream tensor `x`.

Shapes: `x` is the residual state viewed as [..., n, C] (stream index before C), `y` a sublayer
output [..., C]; the leading dims are tokens in any layout ([s, b] in Megatron).
"""

import torch

__all__ = [
    "sinkhorn",
    "mhc_mappings",
    "mhc_mappings_collapse",
    "hc_mappings",
    "hc_static_mappings",
    "mhc_collapse",
    "mhc_update",
    "mhc_head",
]


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp projection of [..., n, n] logits onto the doubly stochastic matrices.

    Softmax over the last axis, then alternate column and row normalisation, ending on columns
    (docs/math.md, mappings step 6): the columns, which weight the streams every output stream
    reads, sum to 1.
    """
    (logits,) = _upcast(logits)
    k = torch.softmax(logits, dim=-1) + eps
    k = k / (k.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        k = k / (k.sum(dim=-1, keepdim=True) + eps)
        k = k / (k.sum(dim=-2, keepdim=True) + eps)
    return k


def _upcast(*tensors: torch.Tensor):
    """The tensors in one compute dtype: fp32, or float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _rms_scale(x: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + norm_eps) over the last axis, kept as a trailing singleton dim."""
    return torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + norm_eps)


def mhc_mappings(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
):
    """mHC mappings of x [..., n, C] -> (h_pre [..., n], h_post [..., n], comb [..., n, n]), fp32.

    fn [n*n + 2n, n*C] and base [n*n + 2n] are ordered [pre | post | res (row-major)];
    scale [3] holds the gating factors. comb[j, k] weights input stream j in output stream k.
    """
    n = x.shape[-2]
    x, fn, base, scale = _upcast(x, fn, base, scale)
    flat = x.flatten(-2)
    # The RMS normalisation is applied after the projection: same value, one pass over x.
    m = _rms_scale(flat, norm_eps) * (flat @ fn.t())
    m_pre, m_post, m_res = m.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_res = base.split([n, n, n * n])
    h_pre = torch.sigmoid(scale[0] * m_pre + b_pre) + eps
    h_post = 2.0 * torch.sigmoid(scale[1] * m_post + b_post)
    res_logits = (scale[2] * m_res + b_res).unflatten(-1, (n, n))
    return h_pre, h_post, sinkhorn(res_logits, sinkhorn_iters, eps)


def mhc_mappings_collapse(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
):
    """The mappings of x and the sublayer input they give, as the HC module uses them:
    -> (u [..., C] in x.dtype, h_pre, h_post, comb, residual).

    `residual` is x itself, for the module to pass on to `mhc_update`. A fused backend returns it
    from the same autograd Function, so that the update's gradient of x comes back into this
    op's backward, which then writes dx once (the update's, the collapse's and the mappings'
    contributions added while x is read) instead of autograd adding three n-stream gradients.
    """
    h_pre, h_post, comb = mhc_mappings(x, fn, base, scale, sinkhorn_iters, eps, norm_eps)
    return mhc_collapse(x, h_pre), h_pre, h_post, comb, x


def hc_mappings(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_eps: float = 1e-6,
):
    """Dynamic hyper-connections (Zhu et al.): H = scale * tanh(rmsnorm(X_j) W) + B, per stream j.

    fn [2 + n, C] is W shared by the streams, rows [pre | post | res (n)]; base [n*n + 2n] is B
    ordered like mHC's. Stream j's own features give h_pre[j], h_post[j] and row j of comb, which
    is unconstrained (no Sinkhorn); comb[j, k] weights input stream j in output stream k.
    """
    n = x.shape[-2]
    x, fn, base, scale = _upcast(x, fn, base, scale)
    m = torch.tanh((_rms_scale(x, norm_eps) * x) @ fn.t())  # [..., n, 2 + n]
    b_pre, b_post, b_res = base.split([n, n, n * n])
    h_pre = scale[0] * m[..., 0] + b_pre
    h_post = scale[1] * m[..., 1] + b_post
    comb = scale[2] * m[..., 2:] + b_res.view(n, n)
    return h_pre, h_post, comb


def hc_static_mappings(x: torch.Tensor, base: torch.Tensor):
    """Static hyper-connections: the learned biases alone, broadcast over the tokens of x."""
    n = x.shape[-2]
    tokens = x.shape[:-2]
    b_pre, b_post, b_res = _upcast(base)[0].split([n, n, n * n])
    return (
        b_pre.expand(*tokens, n),
        b_post.expand(*tokens, n),
        b_res.view(n, n).expand(*tokens, n, n),
    )


def mhc_collapse(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Sublayer input u = sum_i h_pre[i] * x_i: [..., n, C], [..., n] -> [..., C] in x.dtype."""
    xc, h_pre = _upcast(x, h_pre)
    return (h_pre.unsqueeze(-1) * xc).sum(dim=-2).to(x.dtype)


def mhc_update(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """Residual update x'_k = h_post[k] * y + sum_j comb[j, k] * x_j -> [..., n, C] in x.dtype.

    `y` is the sublayer output after bias and dropout (Megatron's bias-dropout-add, with the
    residual add replaced by the stream mixing).
    """
    xc, y, h_post, comb = _upcast(x, y, h_post, comb)
    mixed = torch.einsum("...jk,...jc->...kc", comb, xc)
    return (h_post.unsqueeze(-1) * y.unsqueeze(-2) + mixed).to(x.dtype)


def mhc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Learned contract (DeepSeek-V4 head): sum_i w_i x_i with w = sigmoid(scale*m + base) + eps.

    m = rsqrt(mean(x^2) + norm_eps) * (fn @ flatten(x)); fn [n, n*C], base [n], scale [1].
    Returns [..., C] in x.dtype.
    """
    flat, fn, base, scale = _upcast(x.flatten(-2), fn, base, scale)
    m = _rms_scale(flat, norm_eps) * (flat @ fn.t())
    w = torch.sigmoid(scale * m + base) + eps
    return mhc_collapse(x, w)
