"""Shared helpers of the benchmarks under bench/: device and process set-up, timing, copy
bandwidth, header lines, tables.

Timing on CUDA uses CUDA events around each call after warm-up (one synchronisation per
measurement, so no host overhead is hidden or added); on CPU, `time.perf_counter`. Both return
the median of the repeats, in seconds.
"""

import functools
import statistics
import time

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def setup_device(name: str, cpu_platform: bool = True) -> torch.device:
    """The torch device for --device; on `cpu`, with `cpu_platform`, also applies the CPU
    platform of the project (megatron-core's CUDA-only spots), which the Megatron-based
    benchmarks need (it patches torch.cuda functions, which torch.compile then trips on)."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda asked for but no CUDA device is visible "
                "(use --device cpu for a smoke run)"
            )
        return torch.device("cuda")
    if name != "cpu":
        raise SystemExit(f"--device must be cuda or cpu, got {name!r}")
    if not cpu_platform:
        return torch.device("cpu")
    from megatron_mhc.platform.cpu import apply_cpu_platform

    apply_cpu_platform()
    return torch.device("cpu")


def init_one_process_model_parallel(device: torch.device) -> None:
    """torch.distributed and Megatron's parallel state for this process alone (world size 1, every
    parallel size 1), as the Megatron-based benchmarks run; undo with
    `dist.destroy_process_group()`."""
    store = dist.HashStore()  # one process: no rendezvous port to collide on
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1
    )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, warmup: int, repeats: int, setup=None) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls. `setup()`, when given,
    runs before each call outside the timed region (e.g. to zero gradients)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begin
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def add_device_arguments(parser) -> None:
    """--device and --copy-mib (the buffer of the copy-bandwidth measurement), shared by the
    benchmarks that compare against the bandwidth bound; resolve with `resolve_copy_mib`."""
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="buffer size for the copy-bandwidth measurement (default 2048 on cuda, 64 on cpu)",
    )


def resolve_copy_mib(args) -> None:
    """Fills the --copy-mib default for the chosen --device."""
    if args.copy_mib is None:
        args.copy_mib = 2048 if args.device == "cuda" else 64


def copy_bandwidth(
    device: torch.device, nbytes: int = 1 << 30, warmup: int = 3, repeats: int = 10
) -> float:
    """Measured device-to-device copy bandwidth in bytes/s: a `nbytes` buffer copied into
    another one, counting the bytes read plus the bytes written (2 * nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    seconds = time_call(functools.partial(dst.copy_, src), device, warmup, repeats)
    return 2 * nbytes / seconds


def versions() -> str:
    """torch / triton / megatron-core versions, for the header line."""
    parts = [f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:  # not installed or broken: no version to report
        pass
    try:
        from importlib.metadata import version

        parts.append(f"megatron-core {version('megatron-core')}")
    except Exception:
        pass
    return ", ".join(parts)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def bandwidth_header(device: torch.device, bandwidth: float, copy_mib: int) -> str:
    """The start of the header line of the benchmarks held against the bandwidth bound: device,
    versions and the measured copy bandwidth (bytes/s) of a `copy_mib` MiB buffer."""
    return (
        f"device: {device_name(device)}; {versions()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(read+write, {copy_mib} MiB copy)"
    )


def print_table(header, rows) -> None:
    """A markdown table: header is a list of column names, rows lists of cells (str())."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
