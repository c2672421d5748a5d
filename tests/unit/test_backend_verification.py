"""`mhc_kernel_backend=auto` checks the fused backends on its device and takes the fastest that
passed (megatron_mhc.fusions.auto_backend, timing the HC module:
megatron_mhc.transformer.hyper_connection), the same on every rank; the check as a command
(megatron_mhc.transformer.kernel_check).

On CPU the Triton kernels run in Triton's interpreter, in a worker process that has
TRITON_INTERPRET=1 from its start (tests/triton_interpreter.py), with the device
gate injected (`auto` checks nothing on a CPU device) and tiny shapes. Broken kernels are test
doubles: a backend module whose op returns wrong values or raises. The ranks' agreement runs on
two gloo processes with doubles of the reference as the fused backend (no interpreter needed).
"""

import contextlib
import io
import types
import warnings

import pytest
import torch

from megatron_mhc.fusions import FUSED_BACKENDS, auto_backend, reference
from megatron_mhc.transformer import kernel_check
from megatron_mhc.transformer.hyper_connection import HyperConnectionModule, time_hc_module
from tests.dist_utils import environment, run_distributed
from tests.triton_interpreter import interpreter_pool

CUDA = torch.cuda.is_available()
TINY = dict(n=2, hidden=16, dtype=torch.float32)
TOKENS = 4


def _double(ops, name, **replaced):
    """A backend module named `name`: the functions of `ops`, some replaced."""
    module = types.ModuleType(name)
    for fn in reference.__all__:
        setattr(module, fn, replaced.get(fn, getattr(ops, fn)))
    module.SAVES_INPUTS_ONLY = getattr(ops, "SAVES_INPUTS_ONLY", False)
    return module


def _wrong_update(ops):
    return lambda *args: ops.mhc_update(*args) * 1.1


def _raising_head(*_args, **_kwargs):
    raise RuntimeError("kernel launch failed")


def _timer(ms_by_backend):
    """A device where each backend's HC module takes the given time (the CPU interpreter is
    always slower than the reference: these say which one a faster device would take)."""
    return lambda config, ops, *_: ms_by_backend[ops.__name__.rsplit(".", 1)[-1]]


def _select_with(candidates, config, timer=time_hc_module):
    """select() as on a CUDA device that runs `candidates`; the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection = auto_backend.select(
            config, TOKENS, gate=lambda _device: candidates, timer=timer
        )
    return selection, [str(w.message) for w in caught if w.category is RuntimeWarning]


# ----------------------------------------------------------------------------------------------
# Run in the interpreter worker.
# ----------------------------------------------------------------------------------------------
def pick_triton_when_it_passes():
    from megatron_mhc.fusions import triton

    results = {}
    for mhc_type, contract in (("mhc", "learned"), ("hc", "mean")):
        config = kernel_check.check_config(**TINY, mhc_type=mhc_type, contract=contract)
        selection, warned = _select_with(
            {"triton": triton}, config, _timer({"triton": 1.0, "reference": 2.0})
        )
        results[mhc_type] = (
            selection.backend,
            selection.how,
            warned,
            [(c.op, c.tokens, c.error) for c in selection.checks["triton"]],
            selection.summary(),
        )
    return results


def fall_back_on_a_wrong_or_raising_op():
    from megatron_mhc.fusions import triton

    config = kernel_check.check_config(**TINY)
    results = {}
    for what, double in (
        ("wrong", _double(triton, "triton", mhc_update=_wrong_update(triton))),
        ("raises", _double(triton, "triton", mhc_head=_raising_head)),
    ):
        selection, warned = _select_with({"triton": double}, config)
        results[what] = (
            selection.backend,
            selection.module is reference,
            warned,
            [(c.op, c.error) for c in selection.failures()],
            selection.summary(),
        )
    return results


def explicit_backend_skips_the_check_unless_forced():
    config = kernel_check.check_config(
        **TINY, mhc_type="hc_static", contract="mean", backend="triton"
    )
    explicit = auto_backend.select(config, TOKENS, timer=time_hc_module)
    with environment({auto_backend.FORCE_ENV: "1"}):
        forced = auto_backend.select(config, TOKENS, timer=time_hc_module)
    return (
        (explicit.backend, explicit.how, explicit.checks),
        (
            forced.backend,
            forced.how,
            sorted({c.op for c in forced.checks["triton"]}),
            all(c.passed for c in forced.checks["triton"]),
        ),
    )


@pytest.fixture(scope="module")
def interpreted():
    with interpreter_pool() as pool:
        yield pool.apply


def test_auto_takes_triton_when_it_passes_every_op_and_is_fastest_interpreted(interpreted):
    results = interpreted(pick_triton_when_it_passes)
    for mhc_type, ops in (
        ("mhc", ["mhc_mappings_collapse", "mhc_update", "mhc_head"]),
        ("hc", ["hc_mappings", "mhc_collapse", "mhc_update"]),
    ):
        backend, how, warned, checks, summary = results[mhc_type]
        assert (backend, how, warned) == ("triton", "verified", []), summary
        # Every op the model uses, at the model's tokens and at a ragged count, passed.
        assert checks == [(op, t, None) for op in ops for t in (TOKENS, 3)], checks
        assert "HC fwd+bwd triton 1 ms, torch 2 ms" in summary, summary


def test_a_wrong_or_raising_op_falls_back_to_the_reference_with_a_warning_naming_it_interpreted(
    interpreted,
):
    results = interpreted(fall_back_on_a_wrong_or_raising_op)
    for what, op, error in (
        ("wrong", "mhc_update", "output 0: Tensor-likes are not close"),
        ("raises", "mhc_head", "raised RuntimeError: kernel launch failed"),
    ):
        backend, is_reference, warned, failures, summary = results[what]
        assert backend == "torch" and is_reference, summary
        assert len(warned) == 1 and "triton backend failed its check" in warned[0], warned
        assert f"({op} at {TOKENS} tokens: {error}" in warned[0], warned
        assert {f[0] for f in failures} == {op} and f"triton failed: {op}" in summary, summary


def test_an_explicit_backend_is_not_checked_unless_forced_interpreted(interpreted):
    explicit, forced = interpreted(explicit_backend_skips_the_check_unless_forced)
    assert explicit == ("triton", "explicit", {})
    # Forced, it is checked, and kept although the reference is faster on this CPU.
    assert forced == ("triton", "verified", ["mhc_collapse", "mhc_update"], True)


# ----------------------------------------------------------------------------------------------
# In this process: doubles of the reference as the fused backend.
# ----------------------------------------------------------------------------------------------
def test_the_check_leaves_the_rng_state_as_it_was():
    # Default initialisation: building the timed HC module draws from the default generator.
    config = kernel_check.check_config(**TINY)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    selection, warned = _select_with({"triton": _double(reference, "triton")}, config)
    assert torch.equal(torch.get_rng_state(), before)
    assert selection.how == "verified" and not warned and not selection.failures()
    assert set(selection.times_ms) == {"triton", "torch"}


def test_auto_is_the_reference_without_a_cuda_device_and_explicit_torch_is_never_checked():
    if CUDA:
        pytest.skip("this process has a CUDA device")
    for backend in ("auto", "torch"):
        with environment({auto_backend.FORCE_ENV: "1"}):
            selection = auto_backend.select(
                kernel_check.check_config(**TINY, backend=backend), timer=time_hc_module
            )
        assert (selection.backend, selection.module, selection.checks) == ("torch", reference, {})


def agree_across_ranks(rank, _world_size):
    """Two scenarios on two ranks; each rank's own outcome differs from the other's."""
    config = kernel_check.check_config(**TINY)
    correct = _double(reference, "triton")
    broken = _double(reference, "triton", mhc_update=_wrong_update(reference))
    outcomes = []
    # 1. The fused backend passes on rank 1 only (and would be its choice alone).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selection = auto_backend.select(
            config,
            TOKENS,
            gate=lambda _d: {"triton": broken if rank == 0 else correct},
            timer=_timer({"triton": 1.0, "reference": 2.0}),
        )
    outcomes.append((selection.backend, selection.failed_elsewhere, len(selection.failures())))
    # 2. It passes on both; faster than the reference on rank 0 only. (A new double: a rank
    # that had checked this one before would take its choice from the cache.)
    times = {"triton": 1.0 if rank == 0 else 3.0, "reference": 2.0}
    selection = auto_backend.select(
        config,
        TOKENS,
        gate=lambda _d: {"triton": _double(reference, "triton")},
        timer=_timer(times),
    )
    outcomes.append((selection.backend, selection.times_ms))
    return outcomes


def test_ranks_with_different_outcomes_take_the_same_backend():
    rank0, rank1 = run_distributed(agree_across_ranks, 2)
    # The backend that failed on rank 0 is not used on rank 1 either.
    assert rank0[0] == ("torch", (), 2)  # mhc_update at both token counts
    assert rank1[0] == ("torch", ("triton",), 0)
    # Timings agreed as the slowest rank's: the reference, on both.
    assert rank0[1] == rank1[1] == ("torch", {"triton": 3.0, "torch": 2.0})


def run_the_check_command():
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = kernel_check.main(
            ["--n", "2", "--hidden", "16", "--tokens", "4", "--dtype", "bf16", "--repeats", "1"]
        )
    return status, output.getvalue()


def test_the_check_command_prints_the_table_on_cpu(interpreted):
    if CUDA:
        pytest.skip("runs the CPU form of the command (the GPU suite runs the GPU form)")
    status, out = interpreted(run_the_check_command)
    lines = out.splitlines()
    assert status == 0, out
    assert "mHC kernel check on cpu: n=2 C=16 tokens=4 (ragged 3) bf16" in lines[0], lines
    for op in ("mhc_mappings_collapse", "mhc_update", "mhc_head"):
        for tokens in (4, 3):
            assert any(
                line.split()[:3] == ["triton", op, str(tokens)] and line.endswith("ok")
                for line in lines
            ), (op, tokens, lines)
    header = next(i for i, line in enumerate(lines) if "HC fwd+bwd (ms)" in line)
    timed = {line.split()[0]: float(line.split()[1]) for line in lines[header + 1 : -1]}
    assert set(timed) == {"triton", "torch"} and min(timed.values()) > 0, lines
    assert lines[-1].startswith("auto picks: torch (checked on cpu at 4 tokens"), lines


# ----------------------------------------------------------------------------------------------
# GPU (bench/gpu_suite.sh).
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (on CPU `auto` checks nothing)")
def test_auto_verifies_and_takes_a_fused_backend_at_real_size_gpu():
    config = kernel_check.check_config(4, 4096, torch.bfloat16)
    device = torch.device("cuda", torch.cuda.current_device())
    candidates = auto_backend.device_fused_backends(device)
    assert "triton" in candidates
    first = auto_backend.select(config, 4096, timer=time_hc_module)  # compiles the kernels
    assert HyperConnectionModule(config, 0).ops is first.module  # the model takes the choice
    # Compiled: the check alone.
    again = auto_backend.choose(config, 4096, device, candidates, timer=time_hc_module)
    print(
        f"\nauto at n=4, C=4096, 4096 tokens, bf16: first {first.summary()}\n"
        f"again: {again.summary()}"
    )
    assert all(c.passed for c in first.checks["triton"]), first.summary()
    assert first.backend in FUSED_BACKENDS, first.summary()
    assert again.backend in FUSED_BACKENDS, again.summary()
    assert again.seconds < 1.0, again.summary()
