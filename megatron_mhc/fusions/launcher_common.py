"""What the launchers of every fused backend share: tile arithmetic, the device check and the
output buffers of each launcher.

The launchers (`triton/ops.py`, `cutile/ops.py`) have the same signatures in every backend;
they allocate their outputs here, so that both backends hand the autograd Functions
(`fused_functions.py`) the same buffers, and size their tiles with `pow2`/`clamp_pow2`/
`stream_tile`.
"""

import torch


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
