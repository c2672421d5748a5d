"""The fused backends (megatron_mhc.fusions.triton, .cutile) against the reference ops, forward
and backward: one suite, every check run on every backend.

Every fused op is compared with `megatron_mhc.fusions.reference` on fresh random inputs: outputs
(values, dtypes, shapes) and the gradients of every input, fp32 within rtol 1e-5 (atol 1e-6 of
the tensor's largest magnitude, for the entries near zero) and bf16 within 1e-2; nothing may be
NaN or infinite (tests/numerics.py).

On CPU the checks run in one worker process (tests/triton_interpreter.py) with small ragged
shapes: the Triton kernels in Triton's interpreter, the cuTile kernels under the emulation of the
cuTile operations they use (tests/cutile_emulator.py), both through the backend's own launchers
and the front end's autograd Functions. With a GPU the `*_on_gpu` tests run the compiled kernels
in the pytest process, at small ragged and at real sizes: Triton on any CUDA GPU, cuTile on one
its compiler supports (`cutile.is_available()`; MHC_CUTILE_TEST_FORCE=1 runs them on any CUDA
GPU). `-k "on_gpu and triton"` runs only Triton's GPU tests.
"""

import importlib
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest
import torch

from megatron_mhc.fusions import cutile, fused_frontend, get_backend, reference
from tests.numerics import (
    DTYPES,
    TOLERANCES,
    assert_close,
    assert_close_to_exact,
    assert_close_to_scale,
)
from tests.triton_interpreter import interpreter_pool

BACKENDS = ("triton", "cutile")
OPS = ("mhc_mappings", "mhc_mappings_collapse", "mhc_collapse", "mhc_update", "mhc_head")
CUDA = torch.cuda.is_available()
CUTILE_ON_GPU = cutile.is_available() or (CUDA and os.environ.get("MHC_CUTILE_TEST_FORCE") == "1")
GPU_BACKENDS = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (on CPU: the interpreter)"),
    ),
    pytest.param(
        "cutile",
        marks=pytest.mark.skipif(
            not CUTILE_ON_GPU,
            reason=f"needs a GPU cuTile supports: {cutile.UNAVAILABLE_REASON} "
            "(MHC_CUTILE_TEST_FORCE=1 runs these on any CUDA GPU)",
        ),
    ),
]


# ----------------------------------------------------------------------------------------------
# The checks (module-level: they run in the CPU worker, or on a GPU in the pytest process).
# ----------------------------------------------------------------------------------------------
def fused(backend, device):
    """The backend package; on CPU the cuTile kernels run under the emulation."""
    if backend == "cutile" and device == "cpu":
        from tests.cutile_emulator import emulate_cutile

        emulate_cutile()
    return importlib.import_module(f"megatron_mhc.fusions.{backend}")


def launchers(backend, device):
    """The backend's launchers (`ops`), the ones the front end's Functions call."""
    fused(backend, device)
    return importlib.import_module(f"megatron_mhc.fusions.{backend}.ops")


def _make_inputs(op, n, lead, C, dtype, device, gen, variant):
    """Random inputs of `op` (x in `dtype`, the mapping parameters and gates in fp32)."""

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen).mul_(scale).add_(shift).to(device)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.rand(*shape, generator=gen).mul_(scale).add_(shift).to(device)

    x = randn(*lead, n, C).to(dtype)
    K = n * C
    if op in ("mhc_mappings", "mhc_mappings_collapse"):
        M = n * n + 2 * n
        # Logits of order 1: a Sinkhorn far from its fixed point would hide nothing, one at it
        # would make every gradient tiny.
        return [x, randn(M, K, scale=K**-0.5), randn(M, scale=0.5), rand(3, shift=0.5)]
    if op == "mhc_head":
        return [x, randn(n, K, scale=K**-0.5), randn(n, scale=0.5), rand(1, shift=0.5)]
    gate_lead = () if variant == "static" else lead  # shared by all tokens (hc_static)
    if op == "mhc_collapse":
        return [x, rand(*gate_lead, n)]
    y_dtype = torch.bfloat16 if variant == "bf16_y" else dtype
    return [x, randn(*lead, C).to(y_dtype), rand(*gate_lead, n, scale=2.0), rand(*gate_lead, n, n)]


def check_op(
    backend,
    op,
    n,
    lead,
    C,
    dtype_name,
    device="cpu",
    seed=0,
    variant="plain",
    iters=20,
    gpu_tiles=False,
):
    """Forward and every input gradient of the backend's `op` against the reference.

    variant: "plain"; "static" (gates shared by all tokens, broadcast); "bf16_y" (update with a
    bf16 sublayer output into fp32 streams). gpu_tiles: Triton's interpreter runs the tile sizes
    of a GPU instead of its own few large blocks (the cuTile launchers have only the GPU's).
    """
    ops = fused(backend, device)
    gen = torch.Generator().manual_seed(seed)
    inputs = _make_inputs(op, n, tuple(lead), C, DTYPES[dtype_name], device, gen, variant)
    kwargs = {"sinkhorn_iters": iters} if op.startswith("mhc_mappings") else {}
    ref_in = [t.clone().requires_grad_() for t in inputs]
    got_in = [t.clone().requires_grad_() for t in inputs]
    want = getattr(reference, op)(*ref_in, **kwargs)
    with _triton_tiles("gpu" if gpu_tiles else None) if backend == "triton" else nullcontext():
        got = getattr(ops, op)(*got_in, **kwargs)
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{op} output {i}")
        # A gradient for every output (mhc_mappings_collapse: its residual too, as the update's).
        grads = [torch.randn(w.shape, generator=gen).to(device=device, dtype=w.dtype) for w in want]
        torch.autograd.backward(want, grads)
        torch.autograd.backward(got, grads)
    for i, (t, r) in enumerate(zip(got_in, ref_in, strict=True)):
        assert t.grad is not None, f"{op}: no gradient for input {i}"
        assert_close(t.grad, r.grad, f"{op} grad of input {i}")


@contextmanager
def _triton_tiles(block_mode):
    """Triton's launchers with `ops.BLOCK_MODE = block_mode` ("gpu"; None: by where they run)."""
    from megatron_mhc.fusions.triton import ops

    saved, ops.BLOCK_MODE = ops.BLOCK_MODE, block_mode
    try:
        yield
    finally:
        ops.BLOCK_MODE = saved


def check_mappings_collapse_with_unused_outputs(backend, device="cpu"):
    """mhc_mappings_collapse when only some outputs reach the loss (autograd then passes None for
    the others: no collapse term, no residual term, or neither): every gradient as the
    reference's."""
    ops = fused(backend, device)
    gen = torch.Generator().manual_seed(4)
    inputs = _make_inputs("mhc_mappings_collapse", 4, (6,), 37, torch.float32, device, gen, "plain")
    for used in [(0,), (4,), (2, 3), (1, 4), (0, 4)]:  # u; residual; h_post+comb; ...
        grads = {}
        for name, impl, dtype in (
            ("ref", reference, torch.float32),
            ("ref64", reference, torch.float64),
            ("fused", ops, torch.float32),
        ):
            leaves = [t.clone().to(dtype).requires_grad_() for t in inputs]
            outputs = impl.mhc_mappings_collapse(*leaves)
            loss = sum((outputs[i] * (i + 1)).sin().sum() for i in used)
            loss.backward()
            grads[name] = [t.grad for t in leaves]
        for i, (got, want, exact) in enumerate(
            zip(grads["fused"], grads["ref"], grads["ref64"], strict=True)
        ):
            if want is None:
                assert got is None or not got.any(), (used, i)
            else:
                # The gating factors' gradients are sums over tokens that cancel.
                assert_close_to_exact(got, want, exact, f"outputs {used}: grad of input {i}")


# The small fp32 per-token tensors each Function saves besides its inputs, for T tokens.
def _saved_extras(op, T, n):
    return {
        "mhc_head": [(T, n), (T,), (T, n)],  # mn, r, w
        "mhc_mappings": [(T, n * n + 2 * n), (T,)],  # mn, r
        "mhc_mappings_collapse": [(T, n * n + 2 * n), (T,), (T, n)],  # mn, r, h_pre
    }.get(op, [])


def check_saves_inputs_only(backend, op, n=4, lead=(5,), C=37, device="cpu"):
    """The Function saves its inputs as given (the stream tensor x itself, no copy) plus the
    small fp32 per-token tensors of `_saved_extras`, and its backward reads x only when it runs:
    freeing x's storage after forward and restoring it before backward (as MHCRecomputeManager
    does) gives the same gradients."""
    ops = fused(backend, device)
    gen = torch.Generator().manual_seed(1)
    inputs = _make_inputs(op, n, lead, C, torch.float32, device, gen, "plain")
    T = inputs[0].shape[0]

    def run(free_and_restore):
        x, *rest = [t.clone().requires_grad_() for t in inputs]
        streams = x * 1.0  # a non-leaf like the real stream state, whose storage is freed
        out = getattr(ops, op)(streams, *rest)
        out = out if isinstance(out, tuple) else (out,)
        saved = out[0].grad_fn.saved_tensors
        given = [streams, *rest]
        assert len(saved) == len(given) + len(_saved_extras(op, T, n)), f"{op} saved {len(saved)}"
        for s, t in zip(saved, given, strict=False):
            assert s.data_ptr() == t.data_ptr() and s.shape == t.shape, f"{op} copied an input"
        for s, shape in zip(saved[len(given) :], _saved_extras(op, T, n), strict=True):
            assert tuple(s.shape) == shape and s.dtype == torch.float32, f"{op} saved {s.shape}"
        if free_and_restore:
            keep = streams.detach().clone()
            streams.untyped_storage().resize_(0)
            storage = streams.untyped_storage()
            storage.resize_(keep.untyped_storage().size())
            storage.copy_(keep.untyped_storage())
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        return [x.grad] + [r.grad for r in rest]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def check_hc_chain(backend, n, dtype_name, device="cpu"):
    """What HyperConnectionModule and the learned head run, through the backend's ops: the
    mappings and collapse, a sublayer, the update (whose gradient of x comes back through the
    mappings' residual), then the head, against the reference composition; every output and
    gradient. With bf16 streams every value past the first op carries bf16 roundings made at
    different places (a fused kernel rounds once), so the whole chain is held to the bf16
    tolerance."""
    ops = fused(backend, device)
    dt = DTYPES[dtype_name]
    T, C = 6, 37
    K, M = n * C, n * n + 2 * n
    gen = torch.Generator().manual_seed(n + 17)
    inputs = [
        torch.randn(T, n, C, generator=gen).to(dt),
        torch.randn(M, K, generator=gen) * K**-0.5,
        torch.randn(M, generator=gen) * 0.5,
        torch.rand(3, generator=gen) + 0.5,
        torch.randn(n, K, generator=gen) * K**-0.5,
        torch.randn(n, generator=gen) * 0.5,
        torch.rand(1, generator=gen) + 0.5,
    ]
    proj = (torch.randn(C, C, generator=gen) * C**-0.5).to(device)
    weights = torch.randn(T, C, generator=gen).to(device)

    def run(impl):
        leaves = [t.clone().to(device).requires_grad_() for t in inputs]
        x, fn, base, scale, head_fn, head_base, head_scale = leaves
        u, h_pre, h_post, comb, residual = impl.mhc_mappings_collapse(x, fn, base, scale)
        y = torch.tanh(u.float() @ proj).to(dt)
        streams = impl.mhc_update(residual, y, h_post, comb)
        out = impl.mhc_head(streams, head_fn, head_base, head_scale)
        (out.float() * weights).sum().backward()
        return [u, h_pre, h_post, comb, streams, out] + [t.grad for t in leaves]

    names = ["u", "h_pre", "h_post", "comb", "update", "head", "grad x", "grad fn", "grad base"]
    names += ["grad scale", "grad head fn", "grad head base", "grad head scale"]
    rtol, atol = TOLERANCES[dt]
    for g, w, name in zip(run(ops), run(reference), names, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.isfinite(g).all(), name
        torch.testing.assert_close(
            g.float(),
            w.float(),
            rtol=rtol,
            atol=atol * w.float().abs().max().item(),
            msg=lambda m, name=name: f"{name}: {m}",
        )


def check_mappings_launchers(backend, n, T, C, dtype_name, iters, device="cpu"):
    """The mappings' launchers chained as the front end's Function chains them (proj_rms_fwd,
    mhc_gates_fwd; mhc_gates_bwd, proj_rms_bwd) against the reference's values and gradients
    (random dh_pre, dh_post, dcomb); proj_rms_bwd also with the collapse term (against autograd
    of mhc_collapse(x, w) added) and a residual gradient, and with dx or dfn alone."""
    ops = launchers(backend, device)
    dt = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(n * 1000 + T + iters)
    K, M = n * C, n * n + 2 * n

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = randn(T, n, C).to(dt)
    fn, base, scale = randn(M, K, scale=K**-0.5), randn(M, scale=0.5), randn(3).abs() + 0.5
    dh_pre, dh_post, dcomb = randn(T, n), randn(T, n), randn(T, n, n)
    w, du, residual = randn(T, n).abs(), randn(T, C).to(dt), randn(T, n, C).to(dt)
    eps, norm_eps = 1e-6, 1e-6

    ref = [t.clone().requires_grad_() for t in (x, fn, base, scale)]
    want = reference.mhc_mappings(*ref, iters, eps, norm_eps)
    grads = torch.autograd.grad(want, ref, (dh_pre, dh_post, dcomb), retain_graph=True)
    u = reference.mhc_collapse(ref[0], w)
    dx_collapse = torch.autograd.grad([*want, u], ref[0], (dh_pre, dh_post, dcomb, du))[0]
    ref64 = [t.detach().double().requires_grad_() for t in (x, fn, base, scale)]
    grads64 = torch.autograd.grad(
        reference.mhc_mappings(*ref64, iters, eps, norm_eps),
        ref64,
        (dh_pre.double(), dh_post.double(), dcomb.double()),
    )

    x2 = x.view(T, K)
    mn, r = ops.proj_rms_fwd(x2, fn, norm_eps)
    got = ops.mhc_gates_fwd(mn, base, scale, n, iters, eps)
    for g_, w_, what in zip(got, want, ("h_pre", "h_post", "comb"), strict=True):
        assert_close(g_, w_, f"mappings {what}")

    g, coef, dbase, dscale = ops.mhc_gates_bwd(
        mn, r, base, scale, dh_pre, dh_post, dcomb, n, K, iters, eps
    )
    dx, dfn = ops.proj_rms_bwd(x2, fn, g, coef, True, True, dt)
    assert_close(dx.view(x.shape), grads[0], "mappings dx")
    assert_close(dfn, grads[1], "mappings dfn")
    assert_close_to_exact(dbase, grads[2], grads64[2], "mappings dbase")
    assert_close_to_exact(dscale, grads[3], grads64[3], "mappings dscale")

    dx_all, no_dfn = ops.proj_rms_bwd(
        x2, fn, g, coef, True, False, dt, collapse=(w, du, C), residual=residual.view(T, K)
    )
    assert no_dfn is None
    assert_close(
        dx_all.view(x.shape),
        (dx_collapse.float() + residual.float()).to(dt),
        "mappings dx + collapse dx + residual",
    )
    no_dx, dfn_alone = ops.proj_rms_bwd(x2, fn, g, coef, False, True, dt)
    assert no_dx is None
    torch.testing.assert_close(dfn_alone, dfn, rtol=0, atol=0)


def check_hyper_connection_module(n=4, seed=0):
    """HyperConnectionModule with mhc_kernel_backend='triton' against the same module (same
    parameters) on the 'torch' backend: mappings, collapse, update and every gradient."""
    from megatron_mhc import MHCTransformerConfig
    from megatron_mhc.fusions import triton as triton_ops
    from megatron_mhc.transformer.hyper_connection import HyperConnectionModule

    common = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        enable_mhc_connections=True,
        mhc_num_residual_streams=n,
        use_cpu_initialization=True,
    )
    torch.manual_seed(seed)
    ref_mod = HyperConnectionModule(MHCTransformerConfig(**common, mhc_kernel_backend="torch"), 0)
    tri_mod = HyperConnectionModule(MHCTransformerConfig(**common, mhc_kernel_backend="triton"), 0)
    assert tri_mod.ops is triton_ops
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the init (scale 0.01), so that every path matters
        ref_mod.fn.copy_(torch.randn(ref_mod.fn.shape, generator=gen) * (n * 32) ** -0.5)
        ref_mod.base.copy_(torch.randn(ref_mod.base.shape, generator=gen) * 0.5)
        ref_mod.scale.copy_(torch.rand(3, generator=gen) + 0.5)
    tri_mod.load_state_dict(ref_mod.state_dict())
    x0 = torch.randn(3, 2, n, 32, generator=gen)
    proj = torch.randn(32, 32, generator=gen) * 32**-0.5
    bias = torch.randn(32, generator=gen)
    weights = torch.randn(3, 2, n, 32, generator=gen)

    def step(mod):
        x = x0.clone().requires_grad_()
        hc = mod(x)
        y = torch.tanh(hc.sublayer_input @ proj)
        out = mod.update(hc.streams, (y, bias), hc.h_post, hc.comb, dropout_p=0.0)
        (out * weights).sum().backward()
        return [hc.h_pre, hc.h_post, hc.comb, hc.sublayer_input, out, x.grad] + [
            p.grad for p in mod.parameters()
        ]

    names = ["h_pre", "h_post", "comb", "collapse", "update", "grad x", "grad params..."]
    for i, (got, want) in enumerate(zip(step(tri_mod), step(ref_mod), strict=True)):
        assert_close(got, want, names[min(i, len(names) - 1)])


def check_recompute_with_triton_backend():
    """A tiny mHC GPT (learned head) on the triton backend: training with the recompute manager
    (which frees the stream states after forward and restores them before backward) is bitwise
    the training without it, and both match the torch backend."""
    import torch.distributed as dist

    from megatron_mhc.platform.cpu import apply_cpu_platform
    from tests.dist_utils import destroy_model_parallel, export_grads, initialize_model_parallel
    from tests.tiny_gpt import (
        MHC_4_STREAMS,
        batches,
        build_tiny_gpt,
        forward_backward,
        tiny_config,
    )

    apply_cpu_platform()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_model_parallel(1, 1)
        results, weights = {}, None
        for backend, block in [("torch", None), ("triton", None), ("triton", 2)]:
            model = build_tiny_gpt(
                tiny_config(
                    **MHC_4_STREAMS,
                    num_layers=4,
                    mhc_output_contract="learned",
                    mhc_kernel_backend=backend,
                    mhc_recompute_layer_num=block,
                )
            )
            weights = weights if weights is not None else model.state_dict()
            model.load_state_dict(weights)
            torch.manual_seed(5)
            loss = forward_backward(model, batches())
            results[backend, block] = loss, {k[0]: g for k, (g, _) in export_grads(model).items()}
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
    (loss_ref, grads_ref), (loss, grads), (loss_rc, grads_rc) = results.values()
    assert loss_rc == loss and grads_rc.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_rc[name], grad), f"recompute changed the gradient of {name}"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        # Some mapping gradients are ~1e-7 at init (scale 0.01), the sum of terms of ~1e-3:
        # fp32 cancellation, not the ops' precision (checked op by op above).
        assert_close_to_scale(grad, grads_ref[name], 1e-4, name)


# ----------------------------------------------------------------------------------------------
# CPU: every backend in the worker (Triton interpreted, cuTile emulated).
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def on_cpu():
    """Runs fn(*args) in the worker process whose kernels run on CPU."""
    with interpreter_pool() as pool:
        yield lambda fn, *args, **kwargs: pool.apply(fn, args, kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(on_cpu, backend, op, n, dtype):
    on_cpu(check_op, backend, op, n, (5,), 37, dtype, seed=n)


@pytest.mark.parametrize("op", OPS)
def test_single_stream_matches_the_reference(on_cpu, backend, op):
    on_cpu(check_op, backend, op, 1, (5,), 37, "fp32", seed=11)


@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("op", OPS)
def test_many_blocks_leading_dims_odd_n_with_gpu_tiles(on_cpu, backend, op, n):
    """Several token and channel blocks, [s, b] leading dims, n = 3 (padded to 4), with the
    tile sizes of a GPU (tiny token blocks, token splits of the dfn reduction)."""
    on_cpu(check_op, backend, op, n, (2, 35), 300, "fp32", seed=5, gpu_tiles=True)


@pytest.mark.parametrize("op", OPS)
def test_triton_interpreter_tiles_many_blocks(on_cpu, op):
    """Several blocks with the interpreter's own tile sizes (a few large blocks)."""
    on_cpu(check_op, "triton", op, 3, (2, 35), 300, "fp32", seed=5)


@pytest.mark.parametrize(
    "op,variant", [("mhc_collapse", "static"), ("mhc_update", "static"), ("mhc_update", "bf16_y")]
)
def test_broadcast_gates_and_mixed_dtypes(on_cpu, backend, op, variant):
    dtype = "fp32" if variant == "bf16_y" else "bf16"
    on_cpu(check_op, backend, op, 4, (3, 2), 37, dtype, seed=7, variant=variant)


@pytest.mark.parametrize("iters", [1, 2, 7])
def test_sinkhorn_iteration_counts(on_cpu, backend, iters):
    on_cpu(check_op, backend, "mhc_mappings", 4, (5,), 37, "fp32", seed=iters, iters=iters)


@pytest.mark.parametrize("op", OPS)
def test_saves_only_inputs(on_cpu, backend, op):
    on_cpu(check_saves_inputs_only, backend, op)


def test_mappings_collapse_with_unused_outputs(on_cpu, backend):
    on_cpu(check_mappings_collapse_with_unused_outputs, backend)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 4])
def test_hc_module_ops_chained_match_reference(on_cpu, backend, n, dtype):
    if backend == "triton" and dtype == "bf16":
        pytest.skip(
            "Triton's interpreter truncates bf16 stores instead of rounding them: over a chain "
            "of ops that drifts past 1e-2 (the chain runs in bf16 on a GPU)"
        )
    on_cpu(check_hc_chain, backend, n, dtype)


@pytest.mark.parametrize(
    "n,T,C,dtype,iters",
    [
        (1, 5, 37, "fp32", 20),
        (3, 70, 300, "bf16", 1),
        (8, 70, 300, "fp32", 20),
    ],
)
def test_mappings_launchers_match_reference(on_cpu, backend, n, T, C, dtype, iters):
    on_cpu(check_mappings_launchers, backend, n, T, C, dtype, iters)


def test_hyper_connection_module_on_triton_backend(on_cpu):
    on_cpu(check_hyper_connection_module)


def test_recompute_manager_with_triton_backend():
    with interpreter_pool() as pool:  # a worker of its own: this one patches the CPU platform
        pool.apply(check_recompute_with_triton_backend)


# ----------------------------------------------------------------------------------------------
# CPU, in the pytest process: the front end's paths that run no kernel, availability.
# ----------------------------------------------------------------------------------------------
def test_unfused_ops_are_the_front_ends(backend):
    ops = importlib.import_module(f"megatron_mhc.fusions.{backend}")
    assert set(reference.__all__) <= set(ops.__all__)
    assert ops.SAVES_INPUTS_ONLY is True
    assert ops.hc_mappings is fused_frontend.hc_mappings
    assert ops.sinkhorn is reference.sinkhorn
    assert ops.hc_static_mappings is reference.hc_static_mappings


def test_unfused_hc_mappings_save_only_inputs_and_match_reference():
    gen = torch.Generator().manual_seed(3)
    n, C = 4, 16
    inputs = [
        torch.randn(6, n, C, generator=gen),
        torch.randn(2 + n, C, generator=gen),
        torch.randn(n * n + 2 * n, generator=gen),
        torch.rand(3, generator=gen),
    ]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    got_in = [t.clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = fused_frontend.hc_mappings(*got_in)
    assert {t.untyped_storage().data_ptr() for t in saved} <= {
        t.untyped_storage().data_ptr() for t in got_in
    }
    want = reference.hc_mappings(*ref_in)
    grads = [torch.randn(w.shape, generator=gen) for w in want]
    torch.autograd.backward(want, grads)
    torch.autograd.backward(got, grads)
    for g, w in zip(
        [*got, *(t.grad for t in got_in)], [*want, *(t.grad for t in ref_in)], strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_float64_and_empty_use_the_reference(backend):
    ops = importlib.import_module(f"megatron_mhc.fusions.{backend}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    h = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    comb = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ops.mhc_collapse(x, h), reference.mhc_collapse(x, h), rtol=0, atol=0)
    torch.testing.assert_close(
        ops.mhc_update(x, y, h, comb), reference.mhc_update(x, y, h, comb), rtol=0, atol=0
    )
    empty = torch.empty(0, 4, 5)
    assert ops.mhc_collapse(empty, torch.empty(0, 4)).shape == (0, 5)


def _kernels_can_run_here(backend):
    return CUDA or (backend == "triton" and os.environ.get("TRITON_INTERPRET"))


def test_cpu_tensors_and_wrong_shapes_are_clear_errors(backend):
    if _kernels_can_run_here(backend):
        pytest.skip(f"the {backend} kernels can run in this process")
    ops = importlib.import_module(f"megatron_mhc.fusions.{backend}")
    with pytest.raises(RuntimeError, match=f"mhc_kernel_backend='{backend}' needs CUDA tensors"):
        ops.mhc_collapse(torch.randn(3, 4, 5), torch.rand(3, 4))
    with pytest.raises(ValueError, match=f"{backend} backend: h_pre"):
        ops.mhc_collapse(torch.randn(3, 4, 5), torch.rand(3, 3))


def test_explicit_backend_without_gpu_is_an_error_with_the_reason(backend):
    if _kernels_can_run_here(backend):
        pytest.skip(f"the {backend} kernels can run in this process")
    ops = importlib.import_module(f"megatron_mhc.fusions.{backend}")
    assert ops.is_available() is False
    if backend == "triton":
        why = "TRITON_INTERPRET"
    elif "cuda.tile cannot be imported" in cutile.UNAVAILABLE_REASON:
        why = "cuda.tile cannot be imported"
    else:
        assert cutile.UNAVAILABLE_REASON == "no CUDA device (cuTile has no CPU mode)"
        why = "no CUDA device"
    with pytest.raises(ValueError, match=rf"mhc_kernel_backend='{backend}' cannot run here.*{why}"):
        get_backend(backend)


@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="not a Hopper GPU"
)
def test_cutile_unavailable_on_hopper():
    assert cutile.is_available() is False
    assert "does not support Hopper" in cutile.UNAVAILABLE_REASON


def test_cutile_runs_on_every_architecture_its_compiler_supports_but_hopper():
    for cap in [(8, 0), (8, 6), (8, 9), (10, 0), (10, 3), (12, 0)]:
        assert cutile._arch_reason(cap) is None, cap
    assert cutile._arch_reason((9, 0)) == "cuTile's compiler does not support Hopper (sm_90)"
    for cap in [(7, 0), (7, 5)]:
        assert "does not support sm_7" in cutile._arch_reason(cap)


def test_importing_the_backends_imports_neither_triton_nor_cuda_tile():
    code = (
        "import sys, megatron_mhc.fusions.triton, megatron_mhc.fusions.cutile; "
        "assert 'cuda.tile' not in sys.modules and 'triton' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('cuda', 'triton')))"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        timeout=120,
        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels, in this process.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_on_gpu_ragged(gpu_backend, op, n, dtype):
    for seed, (lead, C) in enumerate([((5,), 37), ((3, 67), 300), ((2, 33), 1000)]):
        check_op(gpu_backend, op, n, lead, C, dtype, device="cuda", seed=n + seed)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "op,variant", [("mhc_collapse", "static"), ("mhc_update", "static"), ("mhc_update", "bf16_y")]
)
def test_broadcast_gates_and_mixed_dtypes_on_gpu(gpu_backend, op, variant):
    check_op(gpu_backend, op, 4, (3, 7), 300, "fp32", device="cuda", variant=variant)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_on_gpu_real_size(gpu_backend, op, n, dtype):
    check_op(gpu_backend, op, n, (1024, 4), 4096, dtype, device="cuda", seed=n)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "n,T,C",
    [(n, T, C) for n in (1, 2, 3, 4, 8) for T, C in ((5, 37), (66, 1000))]
    + [(4, 4096, 4096), (8, 4096, 4096)],
)
def test_mappings_launchers_on_gpu(gpu_backend, n, T, C, dtype, iters):
    check_mappings_launchers(gpu_backend, n, T, C, dtype, iters, device="cuda")


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_saves_only_inputs_on_gpu(gpu_backend, op):
    check_saves_inputs_only(gpu_backend, op, device="cuda")


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hc_module_ops_chained_on_gpu(gpu_backend, dtype):
    check_hc_chain(gpu_backend, 4, dtype, device="cuda")
