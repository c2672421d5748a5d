"""`mhc_kernel_backend=auto`: the fused backends checked on the device the model runs on, then
the fastest that passed.

The first time a model is built in a process for a (device, n, C, dtypes, ops) on a CUDA device,
every fused backend the device supports runs each op the model uses (`ops_used`), forward and
backward, on fresh random inputs at the model's tokens per micro-batch and at a ragged count,
against the reference under the numerics contract (`numerics.py`); then the HC module's forward
and backward is timed (CUDA events) with each backend that passed and with the reference, and
`auto` takes the fastest. A backend that fails (wrong values, NaN, an exception) is skipped with
a warning naming the op; the reference always remains. With torch.distributed initialized, one
all-reduce makes the choice the same on every rank: a backend counts as passed only if it passed
on every rank, and as fast as it is on the slowest. The check runs under a forked RNG state, so
training draws the same random numbers with or without it. Elsewhere (CPU) `auto` is the
reference.

An explicit backend is not checked, unless MHC_VERIFY_BACKEND=1: then it is checked the same
way and replaced by the reference if it fails. `python -m megatron_mhc.fusions.check` prints the
same check as a table.
"""

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from megatron_mhc.fusions import get_backend, numerics, reference

logger = logging.getLogger(__name__)

# In order of preference when two are equally fast.
FUSED_BACKENDS = ("triton", "cutile")
# Tokens per micro-batch when the model's are unknown (a model built outside the entry point).
DEFAULT_TOKENS = 4096
TIMING_REPEATS = 3
FORCE_ENV = "MHC_VERIFY_BACKEND"

# Ops whose inputs after the streams are parameters: their gradients are sums over all tokens.
_PARAMETER_OPS = ("mhc_mappings_collapse", "mhc_head", "hc_mappings")
_INPUT_NAMES = {
    "mhc_mappings_collapse": ("x", "fn", "base", "scale"),
    "mhc_head": ("x", "fn", "base", "scale"),
    "hc_mappings": ("x", "fn", "base", "scale"),
    "mhc_collapse": ("x", "h_pre"),
    "mhc_update": ("x", "y", "h_post", "comb"),
}


def ops_used(config) -> tuple[str, ...]:
    """The mHC ops a model built from config runs (the HC modules, the update, the head)."""
    mappings = {
        "mhc": ("mhc_mappings_collapse",),
        "hc": ("hc_mappings", "mhc_collapse"),
        "hc_static": ("mhc_collapse",),
    }[config.mhc_type]
    head = ("mhc_head",) if config.mhc_output_contract == "learned" else ()
    return (*mappings, "mhc_update", *head)


def model_tokens(config, seq_length: int, micro_batch_size: int) -> int:
    """Tokens an HC module of this rank sees per micro-batch: s·b, split over context-parallel
    ranks and, with sequence parallelism, over tensor-parallel ranks."""
    split = config.context_parallel_size
    if config.sequence_parallel:
        split *= config.tensor_model_parallel_size
    return max(1, seq_length * micro_batch_size // split)


def ragged_tokens(tokens: int) -> int:
    """An odd token count, no multiple of any tile size: the kernels' partial last blocks."""
    return max(tokens // 2, 1) | 1


@dataclasses.dataclass(frozen=True)
class CheckedShape:
    """What the check runs: the model's n, C, dtypes and ops at a number of tokens."""

    n: int
    hidden: int
    dtype: torch.dtype
    """The streams' dtype."""
    sublayer_dtype: torch.dtype
    ops: tuple[str, ...]
    sinkhorn_iters: int
    eps: float
    norm_eps: float

    @classmethod
    def from_config(cls, config) -> "CheckedShape":
        dtype = torch.float32 if config.fp32_residual_connection else config.params_dtype
        return cls(
            config.mhc_num_residual_streams,
            config.hidden_size,
            dtype,
            config.params_dtype,
            ops_used(config),
            config.mhc_sinkhorn_iterations,
            config.mhc_eps,
            config.mhc_norm_eps,
        )

    def kwargs(self, op: str) -> dict:
        if op == "mhc_mappings_collapse":
            return dict(sinkhorn_iters=self.sinkhorn_iters, eps=self.eps, norm_eps=self.norm_eps)
        if op == "mhc_head":
            return dict(eps=self.eps, norm_eps=self.norm_eps)
        if op == "hc_mappings":
            return dict(norm_eps=self.norm_eps)
        return {}

    def inputs(self, op: str, tokens: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Random inputs of op: the streams in the model's dtype, parameters and gates fp32."""
        n, C, K = self.n, self.hidden, self.n * self.hidden

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, device=gen.device).mul_(scale)

        def rand(*shape, scale=1.0, shift=0.0):
            return torch.rand(*shape, generator=gen, device=gen.device).mul_(scale).add_(shift)

        x = randn(tokens, n, C).to(self.dtype)
        # Projections of unit scale: logits of order 1, where the Sinkhorn projection is neither
        # at its fixed point (tiny gradients) nor far from it.
        if op == "mhc_mappings_collapse":
            M = n * n + 2 * n
            return [x, randn(M, K, scale=K**-0.5), randn(M, scale=0.5), rand(3, shift=0.5)]
        if op == "mhc_head":
            return [x, randn(n, K, scale=K**-0.5), randn(n, scale=0.5), rand(1, shift=0.5)]
        if op == "hc_mappings":
            return [
                x,
                randn(2 + n, C, scale=C**-0.5),
                randn(n * n + 2 * n, scale=0.5),
                rand(3, shift=0.5),
            ]
        if op == "mhc_collapse":
            return [x, rand(tokens, n)]
        return [
            x,
            randn(tokens, C).to(self.sublayer_dtype),
            rand(tokens, n, scale=2.0),
            rand(tokens, n, n),
        ]


@dataclasses.dataclass
class OpCheck:
    """One op of one backend at one token count against the reference."""

    backend: str
    op: str
    tokens: int
    error: str | None = None
    """None when the op met the contract; else what broke it (or the exception raised)."""
    worst: float = 0.0
    """Largest |got - want| / max |want| over its outputs and input gradients."""

    @property
    def passed(self) -> bool:
        return self.error is None


def _forward_backward(ops, op, inputs, kwargs, grads_out=None, gen=None):
    """op's outputs and its inputs' gradients for output gradients grads_out (drawn from gen
    when None)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = getattr(ops, op)(*leaves, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if grads_out is None:
        grads_out = [
            torch.randn(o.shape, generator=gen, device=gen.device).to(o.dtype) for o in outputs
        ]
    torch.autograd.backward(outputs, grads_out)
    return [o.detach() for o in outputs], [t.grad for t in leaves], grads_out


def check_op(
    name: str, ops: ModuleType, op: str, shape: CheckedShape, tokens: int, gen: torch.Generator
) -> OpCheck:
    """op of backend `ops` against the reference, forward and every input gradient."""
    result = OpCheck(name, op, tokens)
    try:
        _compare(result, ops, op, shape, tokens, gen)
    except Exception as err:  # a kernel that does not run here is a failed check, not a crash
        result.error = _raised(err)
    return result


def _raised(err: Exception) -> str:
    return f"raised {type(err).__name__}: {' '.join(str(err).split())}"


def _compare(result: OpCheck, ops, op, shape, tokens, gen) -> None:
    inputs = shape.inputs(op, tokens, gen)
    kwargs = shape.kwargs(op)
    want, want_grads, grads_out = _forward_backward(reference, op, inputs, kwargs, gen=gen)
    got, got_grads, _ = _forward_backward(ops, op, inputs, kwargs, grads_out)
    exact_grads = []  # the float64 reference's, computed only if an fp32 comparison fails

    def exact(i):
        if not exact_grads:
            exact_grads.extend(
                _forward_backward(
                    reference,
                    op,
                    [t.double() for t in inputs],
                    kwargs,
                    [g.double() for g in grads_out],
                )[1]
            )
        return exact_grads[i]

    names = _INPUT_NAMES[op]
    compared = [(f"output {i}", g, w, None) for i, (g, w) in enumerate(zip(got, want, strict=True))]
    compared += [
        (f"grad of {names[i]}", g, w, i if op in _PARAMETER_OPS and i > 0 else None)
        for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True))
    ]
    for what, g, w, parameter in compared:
        if g is None:
            result.error = f"{what}: none"
            return
        problem = (
            numerics.mismatch(g, w)
            if parameter is None
            else numerics.mismatch_from_exact(g, w, exact(parameter))
        )
        if g.shape == w.shape and w.numel():
            diff = (g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)
            result.worst = max(result.worst, diff.item())
        if problem is not None:
            result.error = f"{what}: {problem}"
            return


def verify(
    name: str, ops: ModuleType, shape: CheckedShape, tokens: int, gen: torch.Generator
) -> list[OpCheck]:
    """Every op of the shape at `tokens` and at a ragged count."""
    counts = dict.fromkeys((tokens, ragged_tokens(tokens)))
    return [check_op(name, ops, op, shape, t, gen) for op in shape.ops for t in counts]


def time_hc_module(
    config,
    ops: ModuleType,
    tokens: int,
    device: torch.device,
    gen: torch.Generator,
    repeats: int = TIMING_REPEATS,
) -> float:
    """Milliseconds of an HC module's forward, update and backward running `ops`, averaged over
    `repeats` after one warm-up (compilation); CUDA events on a GPU."""
    from megatron_mhc.transformer.hyper_connection import HyperConnectionModule

    module_config = copy.copy(config)
    module_config.mhc_kernel_backend = "torch"  # built without a check of its own
    module = HyperConnectionModule(module_config, hc_index=0).to(device)
    module.ops = ops
    shape = CheckedShape.from_config(config)
    streams = torch.randn(tokens, shape.n, shape.hidden, generator=gen, device=device)
    streams = streams.to(shape.dtype).requires_grad_()
    grad = torch.randn(streams.shape, generator=gen, device=device).to(shape.dtype)

    def step():
        sub = module(streams)
        out = module.update(sub.streams, (sub.sublayer_input, None), sub.h_post, sub.comb, 0.0)
        out.backward(grad)

    step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - begin) * 1e3 / repeats


@dataclasses.dataclass
class Selection:
    """The backend a model uses, and how it was chosen."""

    backend: str
    module: ModuleType
    how: str
    """`explicit`, `reference` (nothing to check on this device) or `verified`."""
    device: torch.device | None = None
    tokens: int = 0
    checks: dict[str, list[OpCheck]] = dataclasses.field(default_factory=dict)
    """This rank's checks, by backend."""
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    """HC module forward+backward, the slowest rank's, by backend (inf: not timed)."""
    failed_elsewhere: tuple[str, ...] = ()
    """Backends that passed here but failed on another rank."""
    seconds: float = 0.0

    def failures(self) -> list[OpCheck]:
        return [c for checks in self.checks.values() for c in checks if not c.passed]

    def summary(self) -> str:
        if self.how != "verified":
            return f"{self.backend} ({self.how})"
        times = ", ".join(f"{b} {t:.3g} ms" for b, t in self.times_ms.items() if t < math.inf)
        text = (
            f"{self.backend} (checked on {self.device} at {self.tokens} tokens in "
            f"{self.seconds:.2f} s; HC fwd+bwd {times})"
        )
        rejected = {c.backend: c for c in reversed(self.failures())}
        for backend, c in rejected.items():
            text += f"; {backend} failed: {c.op} at {c.tokens} tokens: {c.error}"
        for backend in self.failed_elsewhere:
            text += f"; {backend} failed on another rank"
        return text


Timer = Callable[..., float]


def choose(
    config,
    tokens: int,
    device: torch.device,
    candidates: dict[str, ModuleType],
    keep: str | None = None,
    timer: Timer = time_hc_module,
    repeats: int = TIMING_REPEATS,
) -> Selection:
    """Checks each candidate fused backend, times those that passed and the reference, and
    takes the fastest (or `keep`, an explicit choice, if it passed), agreed across ranks."""
    begin = time.perf_counter()
    shape = CheckedShape.from_config(config)
    forked_rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with forked_rng, torch.enable_grad():  # a model may be built under no_grad
        gen = torch.Generator(device=device).manual_seed(0)
        with _full_fp32_matmuls():
            checks = {
                name: verify(name, ops, shape, tokens, gen) for name, ops in candidates.items()
            }
        timed = {
            name: ops for name, ops in candidates.items() if all(c.passed for c in checks[name])
        }
        times = {}
        for name, ops in {**timed, "torch": reference}.items():
            try:
                times[name] = timer(config, ops, tokens, device, gen, repeats)
            except Exception as err:  # e.g. out of memory: the backend is not used
                checks.setdefault(name, []).append(
                    OpCheck(name, "HC module fwd+bwd", tokens, _raised(err))
                )
    names = (*FUSED_BACKENDS, "torch")
    passed_here = [
        name == "torch" or (name in checks and all(c.passed for c in checks[name]))
        for name in names
    ]
    passed, agreed_times = _agree(passed_here, [times.get(name, math.inf) for name in names])
    if keep is not None and passed[names.index(keep)]:
        backend = keep
    else:
        eligible = [i for i in range(len(names)) if passed[i]]
        backend = names[min(eligible, key=lambda i: agreed_times[i])]
    selection = Selection(
        backend,
        reference if backend == "torch" else candidates[backend],
        "verified",
        device,
        tokens,
        checks,
        {name: t for name, t in zip(names, agreed_times, strict=True) if name in times},
        tuple(
            n
            for n, here, all_ranks in zip(names, passed_here, passed, strict=True)
            if here and not all_ranks
        ),
        time.perf_counter() - begin,
    )
    _report(selection)
    return selection


@contextlib.contextmanager
def _full_fp32_matmuls():
    """The reference's fp32 matmuls in full fp32 (not TF32), whatever the run has set: the
    spec the kernels are held to."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _agree(passed: list[bool], times: list[float]) -> tuple[list[bool], list[float]]:
    """(passed on every rank, slowest rank's time) per backend: one all-reduce (MAX) when
    torch.distributed is initialized, so that every rank takes the same backend."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return passed, times
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in str(dist.get_backend())
        else torch.device("cpu")
    )
    values = torch.tensor(
        [float(not p) for p in passed] + times, dtype=torch.float64, device=device
    )
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    values = values.tolist()
    return [v == 0.0 for v in values[: len(passed)]], values[len(passed) :]


def _report(selection: Selection) -> None:
    """A warning for each backend that failed here; the decision logged once (rank 0)."""
    for backend in dict.fromkeys(c.backend for c in selection.failures()):
        first = next(c for c in selection.failures() if c.backend == backend)
        warnings.warn(
            f"mHC kernels: the {backend} backend failed its check on {selection.device} "
            f"({first.op} at {first.tokens} tokens: {first.error}); using {selection.backend}",
            RuntimeWarning,
            stacklevel=3,
        )
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        logger.info("mHC kernels: %s", selection.summary())


def device_fused_backends(device: torch.device) -> dict[str, ModuleType]:
    """The fused backends `auto` checks on this device: on a CUDA device, those whose kernels
    can run on it; none elsewhere."""
    if device.type != "cuda":
        return {}
    return runnable_fused_backends()


def runnable_fused_backends() -> dict[str, ModuleType]:
    """The fused backends whose kernels can run in this process (Triton on CPU only in its
    interpreter)."""
    runnable = {}
    for name in FUSED_BACKENDS:
        try:
            runnable[name] = get_backend(name)
        except ValueError:
            pass
    return runnable


_SELECTIONS: dict[tuple, Selection] = {}


def select(
    config,
    tokens: int | None = None,
    gate: Callable[[torch.device], dict[str, ModuleType]] = device_fused_backends,
    timer: Timer = time_hc_module,
) -> Selection:
    """The backend for a model built from config (`config.mhc_kernel_backend`), checked once
    per process and (device, shape, ops); `tokens` per micro-batch (DEFAULT_TOKENS when None).
    `gate` gives the fused backends this device runs (tests inject Triton's interpreter). With
    torch.distributed initialized, every rank must make the same calls (as every rank builds
    its model): the check's agreement is a collective."""
    name = config.mhc_kernel_backend
    forced = os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "on", "yes")
    if name != "auto" and (not forced or name == "torch"):
        return Selection(name, get_backend(name), "explicit")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    candidates = gate(device) if name == "auto" else {name: get_backend(name)}
    if not candidates:
        return Selection("torch", reference, f"reference: no fused backend runs on {device}")
    key = (name, device, CheckedShape.from_config(config), tuple(candidates.items()))
    if key not in _SELECTIONS:
        _SELECTIONS[key] = choose(
            config,
            tokens or DEFAULT_TOKENS,
            device,
            candidates,
            keep=None if name == "auto" else name,
            timer=timer,
        )
    return _SELECTIONS[key]


def startup_summary(config, seq_length: int, micro_batch_size: int) -> str:
    """The kernels of a model built from config, for its start-up line; runs the check (once)
    at the tokens this rank's HC modules see per micro-batch."""
    if not config.mhc_active:
        return "kernels: none (mHC off)"
    tokens = model_tokens(config, seq_length, micro_batch_size)
    return f"kernels: {select(config, tokens).summary()}"
