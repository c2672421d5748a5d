"""Forward and backward time of the mHC ops, per implementation, against the memory-bandwidth bound.

For each shape (T tokens x C hidden, n streams, activation dtype) and each op -- `mappings`,
`collapse`, `update`, `head`, and `module` (`mhc_mappings_collapse` + `mhc_update` around an
identity sublayer, as HyperConnectionModule runs them) -- times forward, backward (after an
untimed forward) and forward + backward, for every variant that can run, side by side in one run:

  torch          the reference (`megatron_mhc.fusions.reference`), called as
                 HyperConnectionModule calls it (saving only the inputs, rerun in backward)
  torch.compile  the reference functions under torch.compile (plain autograd, no wrapper)
  triton         `get_backend("triton")`     cutile   `get_backend("cutile")` (when it exists
                 and runs on the GPU; our backends are called exactly as the module calls them)
  tile_kernels   DeepSeek TileKernels (`tile_kernels.modeling.mhc.functional`: mhc_pre, which
                 fuses mappings + collapse, so it appears under `module` only; mhc_post; mhc_head)
                 -- needs the `tile_kernels` and `tilelang` packages
  te             Transformer Engine Triton mHC ops (`transformer_engine.pytorch.triton.mhc`:
                 mhc_fused_projection / _scale / _sinkhorn / _aggregate / _expand_combine; TE
                 keeps the streams last, [T, C, n], so its inputs are laid out that way)
  liger          Liger-Kernel (`liger_mhc_coeffs`, `liger_mhc_pre`, `liger_mhc_post_res`)

A peer whose package is missing, or whose API is not the one described above, is reported as
"peer X: not benchmarked (reason)" and left out; no API is guessed. Peers may differ from SPEC.md
in details (e.g. TE's log-domain Sinkhorn); the benchmark measures speed, not agreement.

Timing: CUDA events after --warmup calls, median of --repeats (time.perf_counter on CPU).
Gradients are released between repeats, outside the timed region.

Bandwidth bound. Bytes each op must move at least (per token; e = bytes of the activation dtype,
f = 4 for the fp32 mapping tensors, N = n*n + 2n; the fn parameters, read once per call, are
added but negligible at these T):

Per op, forward then backward:
  mappings  fwd: read x n*C*e; write h_pre, h_post, comb N*f
            bwd: read x n*C*e, dh N*f; write dx n*C*e (+ dfn once)
  collapse  fwd: read x n*C*e, h_pre n*f; write u C*e
            bwd: read du C*e, x n*C*e, h_pre n*f; write dx n*C*e, dh_pre n*f
  update    fwd: read x n*C*e, y C*e, h_post+comb (n+n*n)*f; write x' n*C*e
            bwd: read dx' n*C*e, x n*C*e, y C*e, h (n+n*n)*f; write dx n*C*e, dy C*e,
                 dh (n+n*n)*f
  head      fwd: read x n*C*e; write out C*e
            bwd: read dout C*e, x n*C*e; write dx n*C*e
  module    fwd: (3n + 2)*C*e: x read once for mappings+collapse, u written, x and y read,
                 x' written
            bwd: (5n + 3)*C*e: the rest of the (8n + 5)*C*e floor per HC module

The bound is bytes / (measured device-to-device copy bandwidth: a --copy-mib buffer copied with
torch, read + write bytes over the CUDA-event time); "% BW" is bound time / measured time.

    python bench/bench_kernels.py     # H100: T in {8192, 32768}, C in {4096, 7168}
    python bench/bench_kernels.py --backends torch,triton --ops module
    python bench/bench_kernels.py --device cpu --tokens 64 --hidden 64 --repeats 2 --warmup 1
                                      # (the smoke run)
"""

import argparse
import functools
import os

import torch

if __package__:  # imported as bench.bench_kernels
    from bench import common
else:  # run as a script (python bench/bench_kernels.py puts bench/ on sys.path)
    import common

OPS = ("mappings", "collapse", "update", "head", "module")
OUR_BACKENDS = ("torch", "triton", "cutile")
PEERS = ("tile_kernels", "te", "liger")
ALL_VARIANTS = ("torch", "torch.compile", "triton", "cutile") + PEERS
CPU_VARIANTS = ("torch", "torch.compile")
# What the table reports per op and variant, a time column and a "% BW" column each, in this order.
PHASES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    parser.add_argument(
        "--tokens", type=ints, default=[8192, 32768], help="comma-separated token counts T"
    )
    parser.add_argument(
        "--hidden", type=ints, default=[4096, 7168], help="comma-separated hidden sizes C"
    )
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    parser.add_argument("--sinkhorn-iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated variants out of {','.join(ALL_VARIANTS)} "
        f"(default: all on cuda, 'torch' on cpu; on cpu only "
        f"{', '.join(CPU_VARIANTS)} run, the others are only detected)",
    )
    common.add_device_arguments(parser)
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    for op in args.ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}; choose from {OPS}")
    if args.backends is None:
        args.backends = list(ALL_VARIANTS) if args.device == "cuda" else ["torch"]
    else:
        args.backends = [b for b in args.backends.split(",") if b]
    for name in args.backends:
        if name not in ALL_VARIANTS:
            parser.error(f"unknown backend {name!r}; choose from {ALL_VARIANTS}")
    common.resolve_copy_mib(args)
    return args


# ----------------------------------------------------------------------------------------------
# Byte model (see the table in the docstring).


def op_bytes(op, tokens, hidden, n, e):
    """(forward bytes, backward bytes) an op must move at least."""
    f, maps = 4, n * n + 2 * n
    nce, ce = n * hidden * e, hidden * e
    fn_bytes = maps * n * hidden * f
    if op == "mappings":
        return (tokens * (nce + maps * f) + fn_bytes, tokens * (2 * nce + maps * f) + 2 * fn_bytes)
    if op == "collapse":
        return tokens * (nce + n * f + ce), tokens * (ce + 2 * nce + 2 * n * f)
    if op == "update":
        h = (n + n * n) * f
        return tokens * (2 * nce + ce + h), tokens * (3 * nce + 2 * ce + 2 * h)
    if op == "head":
        head_fn = n * n * hidden * f
        return tokens * (nce + ce) + head_fn, tokens * (ce + 2 * nce) + 2 * head_fn
    if op == "module":
        return tokens * (3 * n + 2) * ce, tokens * (5 * n + 3) * ce
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------
# Inputs, in our layout: x [T, n, C], y [T, C], mapping tensors fp32.


def make_inputs(tokens, hidden, n, dtype, device, iters):
    from megatron_mhc.fusions import reference

    gen = torch.Generator(device="cpu").manual_seed(0)
    maps = n * n + 2 * n

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = {
        "x": rand(tokens, n, hidden, dtype=dtype),
        "y": rand(tokens, hidden, dtype=dtype),
        "fn": rand(maps, n * hidden, scale=0.02),
        "base": rand(maps, scale=0.1),
        "scale": torch.full((3,), 0.5, device=device),
        "head_fn": rand(n, n * hidden, scale=0.02),
        "head_base": rand(n, scale=0.1),
        "head_scale": torch.full((1,), 0.5, device=device),
    }
    with torch.no_grad():
        h_pre, h_post, comb = reference.mhc_mappings(
            inputs["x"][: min(tokens, 4096)],
            inputs["fn"],
            inputs["base"],
            inputs["scale"],
            sinkhorn_iters=iters,
        )
        reps = -(-tokens // h_pre.shape[0])
        inputs["h_pre"] = h_pre.repeat(reps, 1)[:tokens].contiguous()
        inputs["h_post"] = h_post.repeat(reps, 1)[:tokens].contiguous()
        inputs["comb"] = comb.repeat(reps, 1, 1)[:tokens].contiguous()
    return inputs


def leaves(*tensors):
    """Fresh leaf tensors requiring grad (detached copies where a layout change is needed)."""
    return [t.detach().requires_grad_(True) for t in tensors]


# ----------------------------------------------------------------------------------------------
# Variants. Each prepare_<op>(inputs, cfg) returns (fn, leaf_tensors): fn() runs the forward and
# returns a tensor or a tuple of tensors to back-propagate through; any layout conversion
# happens in prepare, outside the timed region. A missing method means the op is not offered.


class NotBenchmarked(Exception):
    """A peer or backend that cannot be benchmarked here; the message says why."""


class OurBackend:
    """One of our backends, called exactly as HyperConnectionModule calls it."""

    def __init__(self, name):
        from megatron_mhc.fusions import get_backend
        from megatron_mhc.fusions.save_inputs_only import SaveInputsOnly

        try:
            self.ops = get_backend(name)
        except ValueError as err:
            raise NotBenchmarked(str(err)) from err
        self.name = name
        self._wrap = SaveInputsOnly

    def call(self, op, *inputs):
        # HyperConnectionModule._call: the reference (autograd) is run saving only its inputs.
        if torch.is_grad_enabled() and not getattr(self.ops, "SAVES_INPUTS_ONLY", False):
            return self._wrap.apply(op, *inputs)
        return op(*inputs)

    def mappings_op(self, cfg, with_collapse=False):
        op = self.ops.mhc_mappings_collapse if with_collapse else self.ops.mhc_mappings
        return functools.partial(op, sinkhorn_iters=cfg["iters"], eps=1e-6, norm_eps=1e-6)

    def prepare_mappings(self, inp, cfg):
        args = leaves(inp["x"], inp["fn"], inp["base"], inp["scale"])
        op = self.mappings_op(cfg)
        return (lambda: self.call(op, *args)), args

    def prepare_collapse(self, inp, cfg):
        args = leaves(inp["x"], inp["h_pre"])
        return (lambda: self.call(self.ops.mhc_collapse, *args)), args

    def prepare_update(self, inp, cfg):
        args = leaves(inp["x"], inp["y"], inp["h_post"], inp["comb"])
        return (lambda: self.call(self.ops.mhc_update, *args)), args

    def prepare_head(self, inp, cfg):
        args = leaves(inp["x"], inp["head_fn"], inp["head_base"], inp["head_scale"])
        # HyperConnectionHead calls the head op directly.
        return (lambda: self.ops.mhc_head(*args)), args

    def prepare_module(self, inp, cfg):
        x, fn, base, scale = args = leaves(inp["x"], inp["fn"], inp["base"], inp["scale"])
        pre = self.mappings_op(cfg, with_collapse=True)

        def run():
            u, _h_pre, h_post, comb, streams = self.call(pre, x, fn, base, scale)
            return self.call(self.ops.mhc_update, streams, u, h_post, comb)  # identity sublayer

        return run, args


class TorchCompile:
    """The reference functions under torch.compile, with plain autograd."""

    name = "torch.compile"

    def __init__(self):
        if os.environ.get("TORCHDYNAMO_DISABLE", "").strip() not in ("", "0"):
            raise NotBenchmarked("TORCHDYNAMO_DISABLE is set in the environment")
        from megatron_mhc.fusions import reference

        try:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        except Exception:  # older/newer dynamo without the knob: the default limit then
            pass
        self.ref = reference
        self._compiled = {}

    def compiled(self, key, fn):
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False)
        return self._compiled[key]

    def prepare_mappings(self, inp, cfg):
        args = leaves(inp["x"], inp["fn"], inp["base"], inp["scale"])
        iters = cfg["iters"]
        fn = self.compiled(
            ("mappings", iters),
            lambda x, f, b, s: self.ref.mhc_mappings(x, f, b, s, sinkhorn_iters=iters),
        )
        return (lambda: fn(*args)), args

    def prepare_collapse(self, inp, cfg):
        args = leaves(inp["x"], inp["h_pre"])
        fn = self.compiled("collapse", self.ref.mhc_collapse)
        return (lambda: fn(*args)), args

    def prepare_update(self, inp, cfg):
        args = leaves(inp["x"], inp["y"], inp["h_post"], inp["comb"])
        fn = self.compiled("update", self.ref.mhc_update)
        return (lambda: fn(*args)), args

    def prepare_head(self, inp, cfg):
        args = leaves(inp["x"], inp["head_fn"], inp["head_base"], inp["head_scale"])
        fn = self.compiled("head", self.ref.mhc_head)
        return (lambda: fn(*args)), args

    def prepare_module(self, inp, cfg):
        args = leaves(inp["x"], inp["fn"], inp["base"], inp["scale"])
        iters, ref = cfg["iters"], self.ref

        def module(x, fn, base, scale):
            h_pre, h_post, comb = ref.mhc_mappings(x, fn, base, scale, sinkhorn_iters=iters)
            return ref.mhc_update(x, ref.mhc_collapse(x, h_pre), h_post, comb)

        fn = self.compiled(("module", iters), module)
        return (lambda: fn(*args)), args


class TileKernelsPeer:
    """DeepSeek TileKernels: mhc_pre (mappings + collapse fused), mhc_post, mhc_head."""

    name = "tile_kernels"

    def __init__(self):
        try:
            import tilelang  # noqa: F401
        except Exception as err:
            raise NotBenchmarked(f"tilelang cannot be imported: {err}") from err
        try:
            from tile_kernels.modeling.mhc import functional
        except Exception as err:
            raise NotBenchmarked(
                f"tile_kernels.modeling.mhc.functional cannot be imported: {err}"
            ) from err
        for fn_name in ("mhc_pre", "mhc_post", "mhc_head"):
            if not callable(getattr(functional, fn_name, None)):
                raise NotBenchmarked(f"tile_kernels has no functional.{fn_name}")
        self.f = functional

    def _pre(self, x, fn, scale, base, cfg):
        n = x.shape[-2]
        return self.f.mhc_pre(
            x,
            fn,
            scale,
            base,
            norm_eps=1e-6,
            mhc_mult=n,
            post_mult_value=2.0,
            pre_eps=1e-6,
            sinkhorn_eps=1e-6,
            sinkhorn_repeat=cfg["iters"],
        )

    def prepare_update(self, inp, cfg):
        with torch.no_grad():
            _, (post_mix, comb_mix) = self._pre(inp["x"], inp["fn"], inp["scale"], inp["base"], cfg)
        x, y, post, comb = args = leaves(inp["x"], inp["y"], post_mix, comb_mix)
        return (lambda: self.f.mhc_post(y, x, post, comb)), args

    def prepare_head(self, inp, cfg):
        x, fn, base, scale = args = leaves(
            inp["x"], inp["head_fn"], inp["head_base"], inp["head_scale"]
        )
        n = x.shape[-2]
        return (
            lambda: self.f.mhc_head(x, fn, scale, base, norm_eps=1e-6, mhc_mult=n, pre_eps=1e-6)
        ), args

    def prepare_module(self, inp, cfg):
        x, fn, base, scale = args = leaves(inp["x"], inp["fn"], inp["base"], inp["scale"])

        def run():
            u, (post, comb) = self._pre(x, fn, scale, base, cfg)
            return self.f.mhc_post(u, x, post, comb)  # identity sublayer

        return run, args


class TransformerEnginePeer:
    """Transformer Engine (>= 2.20) Triton mHC ops; streams last: x [T, 1, C, n]."""

    name = "te"
    FUNCTIONS = (
        "mhc_fused_projection",
        "mhc_fused_scale",
        "mhc_fused_sinkhorn",
        "mhc_fused_aggregate",
        "mhc_fused_expand_combine",
    )

    def __init__(self):
        try:
            import transformer_engine
            from transformer_engine.pytorch.triton import mhc
        except Exception as err:
            raise NotBenchmarked(
                f"transformer_engine.pytorch.triton.mhc cannot be imported: {err}"
            ) from err
        missing = [f for f in self.FUNCTIONS if not callable(getattr(mhc, f, None))]
        if missing:
            version = getattr(transformer_engine, "__version__", "?")
            raise NotBenchmarked(
                f"Transformer Engine {version} has no {', '.join(missing)} "
                "(API differs from the one this adapter knows)"
            )
        self.m = mhc

    @staticmethod
    def _te_x(x):  # [T, n, C] -> [T, 1, C, n]
        return x.detach().transpose(-1, -2).contiguous().unsqueeze(1)

    def _mappings(self, x_te, phi, alpha, beta, n):
        tokens = x_te.shape[0]
        h_padded, ms = self.m.mhc_fused_projection(x_te.reshape(tokens, -1), phi, False)
        h_pre, h_post, h_res = self.m.mhc_fused_scale(h_padded, alpha, beta, ms, n)
        h_res = self.m.mhc_fused_sinkhorn(h_res.reshape(tokens, 1, n, n), n, False)
        return h_pre.reshape(tokens, 1, n), h_post.reshape(tokens, 1, n), h_res

    def _params(self, inp):
        dtype = inp["x"].dtype
        # TE's tests give the projection weight the activation dtype, beta the shape [1, N].
        return leaves(inp["fn"].to(dtype), inp["scale"], inp["base"].unsqueeze(0))

    def prepare_mappings(self, inp, cfg):
        n = inp["x"].shape[-2]
        (x,) = leaves(self._te_x(inp["x"]))
        phi, alpha, beta = params = self._params(inp)
        return (lambda: self._mappings(x, phi, alpha, beta, n)), [x, *params]

    def prepare_collapse(self, inp, cfg):
        n, dtype = inp["x"].shape[-2], inp["x"].dtype
        x, h_pre = args = leaves(self._te_x(inp["x"]), inp["h_pre"].to(dtype).unsqueeze(1))
        return (lambda: self.m.mhc_fused_aggregate(x, h_pre, n, False)), args

    def prepare_update(self, inp, cfg):
        n, dtype = inp["x"].shape[-2], inp["x"].dtype
        x, y, h_post, h_res = args = leaves(
            self._te_x(inp["x"]),
            inp["y"].unsqueeze(1),
            inp["h_post"].to(dtype).unsqueeze(1),
            inp["comb"].to(dtype).unsqueeze(1),
        )
        return (lambda: self.m.mhc_fused_expand_combine(y, None, h_post, x, h_res, n, False)), args

    def prepare_module(self, inp, cfg):
        n = inp["x"].shape[-2]
        (x,) = leaves(self._te_x(inp["x"]))
        phi, alpha, beta = params = self._params(inp)

        def run():
            h_pre, h_post, h_res = self._mappings(x, phi, alpha, beta, n)
            u = self.m.mhc_fused_aggregate(x, h_pre, n, False)
            return self.m.mhc_fused_expand_combine(u, None, h_post, x, h_res, n, False)

        return run, [x, *params]


class LigerPeer:
    """Liger-Kernel: liger_mhc_coeffs (mappings), liger_mhc_pre, liger_mhc_post_res."""

    name = "liger"
    FUNCTIONS = ("liger_mhc_coeffs", "liger_mhc_pre", "liger_mhc_post_res")

    def __init__(self):
        reasons = []
        for module_name in ("liger_kernel.transformers.functional", "liger_kernel.ops.mhc"):
            try:
                module = __import__(module_name, fromlist=["_"])
            except Exception as err:
                reasons.append(f"{module_name}: {err}")
                continue
            if all(callable(getattr(module, f, None)) for f in self.FUNCTIONS):
                self.m = module
                return
            reasons.append(f"{module_name} lacks {', '.join(self.FUNCTIONS)}")
        raise NotBenchmarked("; ".join(reasons))

    @staticmethod
    def _params(inp):
        # Liger: phi [n*C, N], separate alpha scalars; h_res[o, i] = our comb[i, o].
        s = inp["scale"]
        return leaves(inp["fn"].t().contiguous(), inp["base"], s[0:1], s[1:2], s[2:3])

    def prepare_mappings(self, inp, cfg):
        (x,) = leaves(inp["x"])
        params = self._params(inp)
        return (lambda: self.m.liger_mhc_coeffs(x, *params, tmax=cfg["iters"], pre_eps=1e-6)), [
            x,
            *params,
        ]

    def prepare_collapse(self, inp, cfg):
        args = leaves(inp["x"], inp["h_pre"])
        return (lambda: self.m.liger_mhc_pre(*args)), args

    def prepare_update(self, inp, cfg):
        x, y, h_post, h_res = args = leaves(
            inp["x"], inp["y"], inp["h_post"], inp["comb"].transpose(-1, -2).contiguous()
        )
        return (lambda: self.m.liger_mhc_post_res(x, y, h_post, h_res)), args

    def prepare_module(self, inp, cfg):
        (x,) = leaves(inp["x"])
        params = self._params(inp)

        def run():
            h_pre, h_post, h_res = self.m.liger_mhc_coeffs(
                x, *params, tmax=cfg["iters"], pre_eps=1e-6
            )
            u = self.m.liger_mhc_pre(x, h_pre)
            return self.m.liger_mhc_post_res(x, u, h_post, h_res)

        return run, [x, *params]


def make_variant(name):
    if name in OUR_BACKENDS:
        return OurBackend(name)
    return {
        "torch.compile": TorchCompile,
        "tile_kernels": TileKernelsPeer,
        "te": TransformerEnginePeer,
        "liger": LigerPeer,
    }[name]()


# ----------------------------------------------------------------------------------------------
# Measurement.


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def measure(variant, op, inputs, cfg, device, warmup, repeats):
    """(forward, backward, forward+backward) seconds, or None when the variant lacks the op. The
    backward is timed on its own, its forward run untimed before each call: a difference of two
    noisy medians can come out negative on a short CPU run."""
    prepare = getattr(variant, f"prepare_{op}", None)
    if prepare is None:
        return None
    fn, args = prepare(inputs, cfg)
    outs = [o for o in as_tuple(fn()) if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]
    del outs

    def release():
        for t in args:
            t.grad = None

    def fwd():
        fn()

    def outputs():
        return [o for o in as_tuple(fn()) if isinstance(o, torch.Tensor) and o.requires_grad]

    def fwd_bwd():
        torch.autograd.backward(outputs(), grads)

    pending = []

    def release_and_forward():
        release()
        pending[:] = outputs()

    def bwd():
        torch.autograd.backward(pending, grads)

    t_fwd = common.time_call(fwd, device, warmup, repeats, setup=release)
    t_bwd = common.time_call(bwd, device, warmup, repeats, setup=release_and_forward)
    t_all = common.time_call(fwd_bwd, device, warmup, repeats, setup=release)
    pending.clear()
    release()
    return t_fwd, t_bwd, t_all


def main(argv=None):
    args = parse_args(argv)
    device = common.setup_device(args.device, cpu_platform=False)  # the ops need no Megatron state
    dtype = common.DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    cfg = {"iters": args.sinkhorn_iters}

    variants = []
    for name in args.backends:
        kind = "peer" if name in PEERS else "backend"
        try:
            variant = make_variant(name)  # detection runs on cpu too (checks the adapters)
        except NotBenchmarked as err:
            print(f"{kind} {name}: not benchmarked ({err})")
            continue
        if device.type == "cpu" and name not in CPU_VARIANTS:
            print(
                f"{kind} {name}: not benchmarked (needs a CUDA device; --device cpu runs "
                f"{', '.join(CPU_VARIANTS)} only)"
            )
            continue
        variants.append(variant)
    if not variants:
        raise SystemExit("no variant can run here")

    bandwidth = common.copy_bandwidth(
        device, args.copy_mib << 20, warmup=max(1, args.warmup), repeats=max(3, args.repeats)
    )
    print(
        f"{common.bandwidth_header(device, bandwidth, args.copy_mib)}; "
        f"n={args.streams} dtype={args.dtype} "
        f"sinkhorn_iters={args.sinkhorn_iters}; tokens={args.tokens} hidden={args.hidden}; "
        f"median of {args.repeats} after {args.warmup} warm-up; "
        f"variants: {', '.join(v.name for v in variants)}"
    )

    header = (
        ["T", "C", "op", "variant"]
        + [f"{phase} (ms)" for phase in PHASES]
        + [f"{phase} % BW" for phase in PHASES]
        + ["vs torch (fwd+bwd)"]
    )

    def share_of_bound(nbytes, seconds):
        """The "% BW" cell: bandwidth-bound time of `nbytes` over the measured `seconds`."""
        return f"{nbytes / bandwidth / seconds * 100:.1f}%" if seconds > 0 else "-"

    rows = []
    for tokens in args.tokens:
        for hidden in args.hidden:
            inputs = make_inputs(tokens, hidden, args.streams, dtype, device, args.sinkhorn_iters)
            for op in args.ops:
                b_fwd, b_bwd = op_bytes(op, tokens, hidden, args.streams, elem)
                results = {}
                for variant in variants:
                    try:
                        results[variant.name] = measure(
                            variant, op, inputs, cfg, device, args.warmup, args.repeats
                        )
                    except Exception as err:  # a kernel failing on a shape: report, go on
                        print(
                            f"{variant.name} {op} T={tokens} C={hidden}: failed "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                        )
                        results[variant.name] = "error"
                    common.synchronize(device)
                ref = results.get("torch")
                for variant in variants:
                    key = [tokens, hidden, op, variant.name]
                    res = results[variant.name]
                    if res is None or res == "error":
                        cell = "n/a" if res is None else "error"
                        rows.append(key + [cell] * (len(header) - len(key)))
                        continue
                    phase_seconds = res  # in PHASES order
                    t_all = phase_seconds[-1]
                    phase_bytes = (b_fwd, b_bwd, b_fwd + b_bwd)
                    speedup = (
                        f"{ref[-1] / t_all:.2f}x" if isinstance(ref, tuple) and t_all > 0 else "-"
                    )
                    rows.append(
                        key
                        + [f"{seconds * 1e3:.3f}" for seconds in phase_seconds]
                        + list(map(share_of_bound, phase_bytes, phase_seconds))
                        + [speedup]
                    )
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    common.print_table(header, rows)


if __name__ == "__main__":
    main()
