"""The pure-PyTorch reference ops against SPEC.md: invariants, orientation, gradients, dtypes."""

import pytest
import torch

from megatron_mhc.fusions import reference as ref


def _mhc_params(n, hidden, dtype=torch.float32, fn_std=1.0, gen=None):
    num_maps = n * n + 2 * n
    fn = torch.randn(num_maps, n * hidden, dtype=dtype, generator=gen) * fn_std
    base = torch.randn(num_maps, dtype=dtype, generator=gen)
    scale = torch.rand(3, dtype=dtype, generator=gen) + 0.5
    return fn, base, scale


@pytest.mark.parametrize("n", [2, 4, 8])
def test_comb_is_doubly_stochastic_after_20_iterations(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(64, n, 16, generator=gen)
    # Logits of standard deviation ~1: rows close to one-hot need more than 20 iterations.
    fn, base, _ = _mhc_params(n, 16, fn_std=(n * 16) ** -0.5, gen=gen)
    base, scale = 0.7 * base, torch.full((3,), 0.7)
    _, _, comb = ref.mhc_mappings(x, fn, base, scale, sinkhorn_iters=20)
    assert comb.dtype == torch.float32
    assert (comb > 0).all()
    torch.testing.assert_close(comb.sum(-1), torch.ones(64, n), atol=1e-3, rtol=0)
    torch.testing.assert_close(comb.sum(-2), torch.ones(64, n), atol=1e-3, rtol=0)


def test_mappings_follow_spec_gates():
    gen = torch.Generator().manual_seed(1)
    n, hidden, eps = 4, 8, 1e-6
    x = torch.randn(5, n, hidden, generator=gen)
    fn, base, scale = _mhc_params(n, hidden, gen=gen)
    h_pre, h_post, comb = ref.mhc_mappings(x, fn, base, scale, sinkhorn_iters=1, eps=eps)
    flat = x.flatten(-2)
    m = (flat @ fn.t()) / flat.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(h_pre, torch.sigmoid(scale[0] * m[:, :n] + base[:n]) + eps)
    torch.testing.assert_close(
        h_post, 2 * torch.sigmoid(scale[1] * m[:, n : 2 * n] + base[n : 2 * n])
    )
    # One iteration: softmax over the last axis, + eps, then one column normalisation.
    k = torch.softmax((scale[2] * m[:, 2 * n :] + base[2 * n :]).view(5, n, n), -1) + eps
    torch.testing.assert_close(comb, k / (k.sum(-2, keepdim=True) + eps))


def test_update_mixes_stream_j_into_stream_k_with_comb_j_k():
    gen = torch.Generator().manual_seed(2)
    n, hidden = 3, 5
    x = torch.randn(4, n, hidden, generator=gen)
    y = torch.randn(4, hidden, generator=gen)
    h_post = torch.rand(4, n, generator=gen)
    comb = torch.rand(4, n, n, generator=gen)
    out = ref.mhc_update(x, y, h_post, comb)
    for k in range(n):
        expected = h_post[:, k, None] * y + sum(comb[:, j, k, None] * x[:, j] for j in range(n))
        torch.testing.assert_close(out[:, k], expected)


def test_collapse_and_head_weight_the_streams():
    gen = torch.Generator().manual_seed(3)
    n, hidden = 4, 6
    x = torch.randn(7, n, hidden, generator=gen)
    h_pre = torch.rand(7, n, generator=gen)
    torch.testing.assert_close(ref.mhc_collapse(x, h_pre), (h_pre[..., None] * x).sum(-2))
    fn = torch.randn(n, n * hidden, generator=gen)
    base, scale = torch.randn(n, generator=gen), torch.rand(1, generator=gen)
    flat = x.flatten(-2)
    m = (flat @ fn.t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
    w = torch.sigmoid(scale * m + base) + 1e-6
    torch.testing.assert_close(ref.mhc_head(x, fn, base, scale), (w[..., None] * x).sum(-2))


def test_hc_mappings_at_init_are_the_static_biases():
    n, hidden = 4, 8
    x = torch.randn(3, n, hidden)
    base = torch.randn(n * n + 2 * n)
    fn = torch.zeros(2 + n, hidden)
    dynamic = ref.hc_mappings(x, fn, base, torch.full((3,), 0.01))
    static = ref.hc_static_mappings(x, base)
    for got, want in zip(dynamic, static, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    assert static[2].shape == (3, n, n)


def test_hc_mappings_are_per_stream_and_unconstrained():
    gen = torch.Generator().manual_seed(4)
    n, hidden = 3, 8
    x = torch.randn(2, n, hidden, generator=gen)
    fn = torch.randn(2 + n, hidden, generator=gen)
    base = torch.randn(n * n + 2 * n, generator=gen)
    scale = torch.tensor([0.5, 1.5, 2.0])
    h_pre, h_post, comb = ref.hc_mappings(x, fn, base, scale)
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    m = torch.tanh(normed @ fn.t())
    torch.testing.assert_close(h_pre, scale[0] * m[..., 0] + base[:n])
    torch.testing.assert_close(h_post, scale[1] * m[..., 1] + base[n : 2 * n])
    torch.testing.assert_close(comb, scale[2] * m[..., 2:] + base[2 * n :].view(n, n))


def _gradcheck(fn, *inputs):
    inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_mhc_mappings():
    gen = torch.Generator().manual_seed(5)
    n, hidden = 3, 4
    x = torch.randn(2, n, hidden, generator=gen)
    fn, base, scale = _mhc_params(n, hidden, fn_std=0.3, gen=gen)
    _gradcheck(lambda *a: ref.mhc_mappings(*a, sinkhorn_iters=5), x, fn, base, scale)


def test_gradcheck_hc_mappings():
    gen = torch.Generator().manual_seed(6)
    n, hidden = 3, 4
    x = torch.randn(2, n, hidden, generator=gen)
    fn = torch.randn(2 + n, hidden, generator=gen)
    base, scale = torch.randn(n * n + 2 * n, generator=gen), torch.rand(3, generator=gen)
    _gradcheck(ref.hc_mappings, x, fn, base, scale)


def test_gradcheck_collapse_update_head():
    gen = torch.Generator().manual_seed(7)
    n, hidden = 3, 4
    x = torch.randn(2, n, hidden, generator=gen)
    y = torch.randn(2, hidden, generator=gen)
    h = torch.rand(2, n, generator=gen)
    comb = torch.rand(2, n, n, generator=gen)
    _gradcheck(ref.mhc_collapse, x, h)
    _gradcheck(ref.mhc_update, x, y, h, comb)
    fn = torch.randn(n, n * hidden, generator=gen)
    _gradcheck(ref.mhc_head, x, fn, torch.randn(n, generator=gen), torch.rand(1, generator=gen))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_mappings_without_overflow(dtype):
    gen = torch.Generator().manual_seed(8)
    n, hidden = 4, 64
    # |x| ~ 1e4: x^2 ~ 1e8 overflows fp16 and loses bf16 precision unless computed in fp32.
    x = (torch.randn(16, n, hidden, generator=gen) * 1e4).to(dtype)
    fn, base, scale = _mhc_params(n, hidden, gen=gen)
    h_pre, h_post, comb = ref.mhc_mappings(x, fn, base, scale)
    for t in (h_pre, h_post, comb):
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
    expected = ref.mhc_mappings(x.float(), fn, base, scale)
    for got, want in zip((h_pre, h_post, comb), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if dtype == torch.float16:
        return  # sums of several 1e4-sized streams exceed fp16's range by construction
    y = (torch.randn(16, hidden, generator=gen) * 1e4).to(dtype)
    outputs = (
        ref.mhc_collapse(x, h_pre),
        ref.mhc_update(x, y, h_post, comb),
        ref.mhc_head(x, fn[:n], base[:n], scale[:1]),
    )
    for out in outputs:
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
