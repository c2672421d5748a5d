"""`mhc_kernel_backend=auto`: the fused backends checked on the device the model runs on, then
the fastest that passed.

The first time a model is built in a process for a (device, n, C, dtypes, ops) on a CUDA device,
every fused backend the device supports runs each op the model uses, forward and backward, on
fresh random inputs at the model's tokens per micro-batch and at a ragged count, against the
reference under the numerics contract (`verification.py`); then the HC module's forward and
backward is timed (CUDA events) with each backend that passed and with the reference, and
`auto` takes the fastest. The timer is the HC module's own, given by the layer that owns the
modules (`megatron_mhc.transformer.hyper_connection.time_hc_module`): the kernels know nothing
of the layers. A backend that fails (wrong values, NaN, an exception) is skipped with a warning
naming the op; the reference always remains. With torch.distributed initialized, one all-reduce
makes the choice the same on every rank: a backend counts as passed only if it passed on every
rank, and as fast as it is on the slowest. The check runs under a forked RNG state, so training
draws the same random numbers with or without it. Elsewhere (CPU) `auto` is the reference.

An explicit backend is not checked, unless MHC_VERIFY_BACKEND=1: then it is checked the same
way and replaced by the reference if it fails. `python -m megatron_mhc.transformer.kernel_check`
prints the same check as a table.
"""

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from megatron_mhc.fusions import reference
from megatron_mhc.fusions.backends import FUSED_BACKENDS, get_backend, runnable_fused_backends
from megatron_mhc.fusions.verification import CheckedShape, OpCheck, raised, verify

logger = logging.getLogger(__name__)

# Tokens per micro-batch when the model's are unknown (a model built outside the entry point).
DEFAULT_TOKENS = 4096
TIMING_REPEATS = 3
FORCE_ENV = "MHC_VERIFY_BACKEND"

Timer = Callable[..., float]
"""(config, ops, tokens, device, gen, repeats) -> milliseconds of an HC module's forward, update
and backward running `ops` (`transformer.hyper_connection.time_hc_module`)."""


def model_tokens(config, seq_length: int, micro_batch_size: int) -> int:
    """Tokens an HC module of this rank sees per micro-batch: s·b, split over context-parallel
    ranks and, with sequence parallelism, over tensor-parallel ranks."""
    split = config.context_parallel_size
    if config.sequence_parallel:
        split *= config.tensor_model_parallel_size
    return max(1, seq_length * micro_batch_size // split)


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


def choose(
    config,
    tokens: int,
    device: torch.device,
    candidates: dict[str, ModuleType],
    *,
    timer: Timer,
    keep: str | None = None,
    repeats: int = TIMING_REPEATS,
) -> Selection:
    """Checks each candidate fused backend, times (`timer`) those that passed and the
    reference, and takes the fastest (or `keep`, an explicit choice, if it passed), agreed
    across ranks."""
    begin = time.perf_counter()
    shape = CheckedShape.from_config(config)
    forked_rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with forked_rng, torch.enable_grad():  # a model may be built under no_grad
        gen = torch.Generator(device=device).manual_seed(0)
        checks = {name: verify(name, ops, shape, tokens, gen) for name, ops in candidates.items()}
        timed = {
            name: ops for name, ops in candidates.items() if all(c.passed for c in checks[name])
        }
        times = {}
        for name, ops in {**timed, "torch": reference}.items():
            try:
                times[name] = timer(config, ops, tokens, device, gen, repeats)
            except Exception as err:  # e.g. out of memory: the backend is not used
                checks.setdefault(name, []).append(
                    OpCheck(name, "HC module fwd+bwd", tokens, raised(err))
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


_SELECTIONS: dict[tuple, Selection] = {}


def select(
    config,
    tokens: int | None = None,
    gate: Callable[[torch.device], dict[str, ModuleType]] = device_fused_backends,
    *,
    timer: Timer,
) -> Selection:
    """The backend for a model built from config (`config.mhc_kernel_backend`), checked once
    per process and (device, shape, ops); `tokens` per micro-batch (DEFAULT_TOKENS when None),
    `timer` the HC module's. `gate` gives the fused backends this device runs (tests inject
    Triton's interpreter). With
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


def startup_summary(config, seq_length: int, micro_batch_size: int, timer: Timer) -> str:
    """The kernels of a model built from config, for its start-up line; runs the check (once)
    at the tokens this rank's HC modules see per micro-batch."""
    if not config.mhc_active:
        return "kernels: none (mHC off)"
    tokens = model_tokens(config, seq_length, micro_batch_size)
    return f"kernels: {select(config, tokens, timer=timer).summary()}"
