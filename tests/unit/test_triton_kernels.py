"""The Triton backend (megatron_mhc.fusions.triton) against the reference ops, forward and backward.

Every fused op is compared with `megatron_mhc.fusions.reference` on fresh random inputs: outputs
(values, dtypes, shapes) and the gradients of every input, fp32 within rtol 1e-5 (atol 1e-6 of
the tensor's largest magnitude, for the entries near zero) and bf16 within 1e-2; nothing may be
NaN or infinite.

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be in the environment
before the process imports triton (Megatron and torch's inductor import it), so these checks run
in one worker process spawned for this module with that variable set from its start (the pytest
process is left as it was), with small ragged shapes. With a GPU the
same checks also run natively in the pytest process, at small ragged and at real sizes.
"""

import multiprocessing
import os

import pytest
import torch

from megatron_mhc.platform.cpu import CPU_ENV
from tests.dist_utils import environment
from tests.functional.pretrain_runs import PORTABLE_CPU_NUMERICS
from tests.numerics import DTYPES, assert_close, assert_close_to_exact

CUDA = torch.cuda.is_available()
OPS = ("mhc_mappings", "mhc_mappings_collapse", "mhc_collapse", "mhc_update", "mhc_head")
NO_GPU = "needs a CUDA GPU (the CPU runs the kernels in Triton's interpreter, at small sizes)"


# ----------------------------------------------------------------------------------------------
# The checks (module-level: they also run in the interpreter worker).
# ----------------------------------------------------------------------------------------------
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
    op, n, lead, C, dtype_name, device="cpu", seed=0, variant="plain", iters=20, block_mode=None
):
    """Forward and every input gradient of the Triton `op` against the reference.

    variant: "plain"; "static" (gates shared by all tokens, broadcast); "bf16_y" (update with a
    bf16 sublayer output into fp32 streams). block_mode: "gpu" runs the GPU tile sizes (under
    the interpreter too). Returns the largest relative error seen, for the record.
    """
    from megatron_mhc.fusions import reference
    from megatron_mhc.fusions import triton as triton_ops
    from megatron_mhc.fusions.triton import ops as triton_impl

    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    inputs = _make_inputs(op, n, tuple(lead), C, dtype, device, gen, variant)
    kwargs = {"sinkhorn_iters": iters} if op.startswith("mhc_mappings") else {}
    ref_in = [t.clone().requires_grad_() for t in inputs]
    tri_in = [t.clone().requires_grad_() for t in inputs]
    want = getattr(reference, op)(*ref_in, **kwargs)
    saved_mode = triton_impl.BLOCK_MODE
    triton_impl.BLOCK_MODE = block_mode
    try:
        got = getattr(triton_ops, op)(*tri_in, **kwargs)
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{op} output {i}")
        grads = [torch.randn(w.shape, generator=gen).to(device=device, dtype=w.dtype) for w in want]
        torch.autograd.backward(want, grads)
        torch.autograd.backward(got, grads)
    finally:
        triton_impl.BLOCK_MODE = saved_mode
    worst = 0.0
    for i, (t, r) in enumerate(zip(tri_in, ref_in)):
        assert t.grad is not None, f"{op}: no gradient for input {i}"
        assert_close(t.grad, r.grad, f"{op} grad of input {i}")
        err = (t.grad.float() - r.grad.float()).abs().max() / r.grad.float().abs().max()
        worst = max(worst, err.item())
    return worst


def check_mappings_collapse_with_unused_outputs(device="cpu"):
    """mhc_mappings_collapse when only some outputs reach the loss (autograd then passes None for
    the others: no collapse term, no residual term, or neither): every gradient as the reference's."""
    from megatron_mhc.fusions import reference
    from megatron_mhc.fusions import triton as triton_ops

    gen = torch.Generator().manual_seed(4)
    inputs = _make_inputs("mhc_mappings_collapse", 4, (6,), 37, torch.float32, device, gen, "plain")
    for used in [(0,), (4,), (2, 3), (1, 4), (0, 4)]:  # u; residual; h_post+comb; ...
        grads = {}
        for name, impl, dtype in (
            ("ref", reference, torch.float32),
            ("ref64", reference, torch.float64),
            ("triton", triton_ops, torch.float32),
        ):
            leaves = [t.clone().to(dtype).requires_grad_() for t in inputs]
            outputs = impl.mhc_mappings_collapse(*leaves)
            loss = sum((outputs[i] * (i + 1)).sin().sum() for i in used)
            loss.backward()
            grads[name] = [t.grad for t in leaves]
        for i, (got, want, exact) in enumerate(zip(grads["triton"], grads["ref"], grads["ref64"])):
            if want is None:
                assert got is None or not got.any(), (used, i)
            else:
                # The gating factors' gradients are sums over tokens that cancel.
                assert_close_to_exact(got, want, exact, f"outputs {used}: grad of input {i}")


def check_saves_inputs_only(op, n=4, lead=(5,), C=37, device="cpu"):
    """The Function saves only its inputs (the stream tensor x itself, no copy) plus small
    per-token tensors, and its backward reads x only when it runs: freeing x's storage after
    forward and restoring it before backward (as MHCRecomputeManager does) gives the same grads."""
    from megatron_mhc.fusions import triton as triton_ops

    gen = torch.Generator().manual_seed(1)
    inputs = _make_inputs(op, n, lead, C, torch.float32, device, gen, "plain")
    T = inputs[0].shape[0]

    def run(free_and_restore):
        x, *rest = [t.clone().requires_grad_() for t in inputs]
        streams = x * 1.0  # a non-leaf like the real stream state, whose storage is freed
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = getattr(triton_ops, op)(streams, *rest)
        out = out if isinstance(out, tuple) else (out,)
        inputs_storage = {t.untyped_storage().data_ptr() for t in [streams, *rest]}
        assert any(
            t.untyped_storage().data_ptr() == streams.untyped_storage().data_ptr() for t in saved
        ), f"{op} did not save the stream tensor itself"
        for t in saved:  # not an input: a small per-token tensor
            assert t.untyped_storage().data_ptr() in inputs_storage or t.numel() <= T * (
                n * n + 2 * n + 1
            ), f"{op} saved {tuple(t.shape)}"
        if free_and_restore:
            keep = streams.detach().clone()
            streams.untyped_storage().resize_(0)
            storage = streams.untyped_storage()
            storage.resize_(keep.untyped_storage().size())
            storage.copy_(keep.untyped_storage())
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        return [x.grad] + [r.grad for r in rest]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
    for i, (got, want) in enumerate(zip(step(tri_mod), step(ref_mod))):
        assert_close(got, want, names[min(i, len(names) - 1)])


def check_recompute_with_triton_backend():
    """A tiny mHC GPT (learned head) on the triton backend: training with the recompute manager
    (which frees the stream states after forward and restores them before backward) is bitwise
    the training without it, and both match the torch backend."""
    import torch.distributed as dist

    from megatron_mhc.platform.cpu import apply_cpu_platform
    from tests.dist_utils import destroy_model_parallel, export_grads, initialize_model_parallel
    from tests.tiny_gpt import batches, build_tiny_gpt, forward_backward, tiny_config

    apply_cpu_platform()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_model_parallel(1, 1)
        results, weights = {}, None
        for backend, block in [("torch", None), ("triton", None), ("triton", 2)]:
            model = build_tiny_gpt(
                tiny_config(
                    enable_mhc_connections=True,
                    mhc_num_residual_streams=4,
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
        want = grads_ref[name]
        torch.testing.assert_close(
            grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=lambda m: f"{name}: {m}"
        )


# ----------------------------------------------------------------------------------------------
# CPU: the interpreter worker.
# ----------------------------------------------------------------------------------------------
# The portable CPU numerics too: the gating factors' gradients are sums over all tokens that
# cancel, and how close the fp32 reference comes to float64 there depends on the CPU's kernels.
_WORKER_ENV = {
    **CPU_ENV,
    **PORTABLE_CPU_NUMERICS,
    "TRITON_INTERPRET": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def _enter_interpreter():
    os.environ.update(_WORKER_ENV)
    torch.set_num_threads(1)


def _interpreter_pool():
    """A one-process pool whose worker has TRITON_INTERPRET=1 from its start."""
    with environment(_WORKER_ENV):  # inherited by the spawned worker from its first line
        return multiprocessing.get_context("spawn").Pool(1, initializer=_enter_interpreter)


@pytest.fixture(scope="module")
def interpreted():
    """Runs fn(*args) in a worker process whose Triton kernels run in the CPU interpreter."""
    with _interpreter_pool() as pool:
        yield lambda fn, *args, **kwargs: pool.apply(fn, args, kwargs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_interpreted(interpreted, op, n, dtype):
    interpreted(check_op, op, n, (5,), 37, dtype, seed=n)


@pytest.mark.parametrize("op", OPS)
def test_single_stream_interpreted(interpreted, op):
    interpreted(check_op, op, 1, (5,), 37, "fp32", seed=11)


@pytest.mark.parametrize("n,block_mode", [(3, None), (3, "gpu"), (8, "gpu")])
@pytest.mark.parametrize("op", OPS)
def test_many_blocks_leading_dims_odd_n_interpreted(interpreted, op, n, block_mode):
    """Several token and channel blocks, [s, b] leading dims, n = 3 (padded to 4), and the GPU
    tile sizes (tiny token blocks, token splits of the dfn reduction) run by the interpreter."""
    interpreted(check_op, op, n, (2, 35), 300, "fp32", seed=5, block_mode=block_mode)


@pytest.mark.parametrize(
    "op,variant", [("mhc_collapse", "static"), ("mhc_update", "static"), ("mhc_update", "bf16_y")]
)
def test_broadcast_gates_and_mixed_dtypes_interpreted(interpreted, op, variant):
    dtype = "fp32" if variant == "bf16_y" else "bf16"
    interpreted(check_op, op, 4, (3, 2), 37, dtype, seed=7, variant=variant)


@pytest.mark.parametrize("iters", [1, 2, 7])
def test_sinkhorn_iteration_counts_interpreted(interpreted, iters):
    interpreted(check_op, "mhc_mappings", 4, (5,), 37, "fp32", seed=iters, iters=iters)


@pytest.mark.parametrize("op", OPS)
def test_saves_only_inputs_interpreted(interpreted, op):
    interpreted(check_saves_inputs_only, op)


def test_mappings_collapse_with_unused_outputs_interpreted(interpreted):
    interpreted(check_mappings_collapse_with_unused_outputs)


def test_hyper_connection_module_interpreted(interpreted):
    interpreted(check_hyper_connection_module)


def test_recompute_manager_with_triton_backend_interpreted():
    with _interpreter_pool() as pool:  # a worker of its own: this one patches the CPU platform
        pool.apply(check_recompute_with_triton_backend)


def test_unfused_hc_mappings_save_only_inputs_and_match_reference():
    from megatron_mhc.fusions import reference
    from megatron_mhc.fusions import triton as triton_ops

    gen = torch.Generator().manual_seed(3)
    n, C = 4, 16
    inputs = [
        torch.randn(6, n, C, generator=gen),
        torch.randn(2 + n, C, generator=gen),
        torch.randn(n * n + 2 * n, generator=gen),
        torch.rand(3, generator=gen),
    ]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    tri_in = [t.clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = triton_ops.hc_mappings(*tri_in)
    assert {t.untyped_storage().data_ptr() for t in saved} <= {
        t.untyped_storage().data_ptr() for t in tri_in
    }
    want = reference.hc_mappings(*ref_in)
    grads = [torch.randn(w.shape, generator=gen) for w in want]
    torch.autograd.backward(want, grads)
    torch.autograd.backward(got, grads)
    for g, w in zip([*got, *(t.grad for t in tri_in)], [*want, *(t.grad for t in ref_in)]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_explicit_triton_backend_without_gpu_is_an_error():
    if CUDA or os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the triton backend can run in this process")
    from megatron_mhc.fusions import get_backend

    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        get_backend("triton")


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels, in this process.
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_gpu_ragged(op, n, dtype):
    check_op(op, n, (5,), 37, dtype, device="cuda", seed=n)
    check_op(op, n, (3, 67), 300, dtype, device="cuda", seed=n + 1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_gpu_real_size(op, n, dtype):
    check_op(op, n, (4096,), 4096, dtype, device="cuda", seed=n)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("op", OPS)
def test_saves_only_inputs_gpu(op):
    check_saves_inputs_only(op, device="cuda")
