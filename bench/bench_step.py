"""Training step time of a GPT with mHC against the same GPT without it, and the bandwidth floor.

One GPU, one process: Megatron's DistributedDataParallel, its optimizer (Adam, mixed precision
with fp32 main parameters in bf16), its forward-backward schedule (`get_forward_backward_func`)
and `optimizer.step()`; a step is all of that, timed with CUDA events, median of --repeats after
--warmup. Variants, side by side in one run: the baseline (plain residual, n = 1) and the mHC
model (n = --streams) with each kernel backend of --backends (`torch` reference, `triton`, ...).

Floor: an HC module must move at least (8n + 5) * C elements per token (forward + backward:
docs/kernels.md counts them), two modules per layer, so per step
    floor bytes = (8n + 5) * C * 2 * layers * tokens_per_step * bytes_per_element
and floor = floor bytes / measured copy bandwidth / baseline step time: the least step-time
overhead mHC can add if its ops were purely bandwidth-bound. Printed per mHC variant: the
overhead (mHC step / baseline step - 1) and overhead / floor (1.0 = at the floor).

Defaults: a ~1.3B dense GPT (24 layers, hidden 2048, 16 heads, seq 2048, micro-batch 2, vocab
50304), sized for an 80 GB H100 with the local spec (unfused attention keeps s x s tensors);
with --transformer-impl transformer_engine (flash attention) a larger --micro-batch fits.

    python bench/bench_step.py                                  # H100, backends torch,triton
    python bench/bench_step.py --transformer-impl transformer_engine --micro-batch 4
    python bench/bench_step.py --device cpu --layers 2 --hidden 64 --heads 4 --seq 32 \
        --micro-batch 2 --vocab 256 --repeats 2 --warmup 1     # smoke (fp32 on cpu)
"""

import argparse
import itertools
import logging
import os

import torch
import torch.distributed as dist

if __package__:  # imported as bench.bench_step
    from bench import common
else:  # run as a script (python bench/bench_step.py puts bench/ on sys.path)
    import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn-hidden", type=int, default=None, help="default 4 * hidden")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument(
        "--backends", default="torch,triton", help="mHC kernel backends, one mHC variant each"
    )
    parser.add_argument(
        "--mhc-recompute",
        default=None,
        help="mhc_recompute_layer_num for the mHC variants (int or 'auto')",
    )
    parser.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default=None,
        help="default: transformer_engine when it is installed and the device is cuda, else local",
    )
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    common.add_device_arguments(parser)
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if args.mhc_recompute not in (None, "auto"):
        args.mhc_recompute = int(args.mhc_recompute)
    common.resolve_copy_mib(args)
    return args


def _te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def build(args, streams, backend, device):
    """(DDP-wrapped model, optimizer, config) for one variant."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from megatron_mhc.config import MHCTransformerConfig
    from megatron_mhc.models.gpt import build_mhc_gpt_model

    on_gpu = device.type == "cuda"
    te = args.transformer_impl == "transformer_engine"
    fusions = dict(  # the local spec's fused paths need apex / compiled kernels: off there
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        persist_layer_norm=te,
        gradient_accumulation_fusion=False,
    )
    config = MHCTransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn_hidden,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        pipeline_dtype=torch.bfloat16 if on_gpu else torch.float32,
        use_cpu_initialization=not on_gpu,
        transformer_impl=args.transformer_impl,
        enable_mhc_connections=streams > 1,
        mhc_num_residual_streams=streams,
        mhc_kernel_backend=backend or "torch",
        mhc_recompute_layer_num=args.mhc_recompute if streams > 1 else None,
        **fusions,
    )
    config.finalize_model_grads_func = finalize_model_grads
    torch.manual_seed(0)
    model = build_mhc_gpt_model(
        config, vocab_size=args.vocab, max_sequence_length=args.seq, position_embedding_type="rope"
    )
    model = model.to(device)
    if on_gpu:
        model = Float16Module(config, model)  # as megatron.training's get_model does for bf16
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=on_gpu, use_distributed_optimizer=args.distributed_optimizer
    )
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.01,
            clip_grad=1.0,
            bf16=on_gpu,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=args.distributed_optimizer,
        ),
        [model],
    )
    return model, optimizer, config


def measure(args, model, optimizer, device):
    """(median step seconds, peak allocated bytes or None)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen).to(device)
    positions = torch.arange(args.seq, device=device).expand(args.micro_batch, -1)
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=device), 1)[
        None, None
    ]
    if args.transformer_impl == "transformer_engine":
        mask = None  # TE's attention applies the causal mask itself (attn_mask_type=causal)
    data = itertools.repeat((tokens, positions, mask))
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, model):
        tok, pos, msk = next(data_iterator)
        output = model(tok, pos, msk, labels=tok)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[model],
            num_microbatches=1,
            seq_length=args.seq,
            micro_batch_size=args.micro_batch,
            forward_only=False,
        )
        update_successful, _, _ = optimizer.step()
        if not update_successful:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = common.time_call(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return seconds, peak


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # as activation_memory.py; no compile here
    logging.getLogger("megatron").setLevel(logging.WARNING)  # DDP/optimizer set-up INFO lines
    device = common.setup_device(args.device)
    if args.transformer_impl is None:
        args.transformer_impl = (
            "transformer_engine" if device.type == "cuda" and _te_installed() else "local"
        )
    elif args.transformer_impl == "transformer_engine" and not _te_installed():
        raise SystemExit(
            "--transformer-impl transformer_engine: Transformer Engine is not installed"
        )
    common.init_one_process_model_parallel(device)

    from megatron_mhc.fusions import get_backend

    variants = [("baseline (n=1)", 1, None)]
    for backend in args.backends:
        try:
            get_backend(backend)
        except ValueError as err:
            print(f"backend {backend}: not benchmarked ({err})")
            continue
        variants.append((f"mHC n={args.streams}, {backend}", args.streams, backend))

    elem = 2 if device.type == "cuda" else 4
    bandwidth = common.copy_bandwidth(device, args.copy_mib << 20)
    tokens_per_step = args.micro_batch * args.seq
    n = args.streams
    floor_bytes = (8 * n + 5) * args.hidden * 2 * args.layers * tokens_per_step * elem
    floor_seconds = floor_bytes / bandwidth

    rows, params = [], {}
    for name, streams, backend in variants:
        model = optimizer = None
        try:
            model, optimizer, _ = build(args, streams, backend, device)
            params[name] = sum(p.numel() for p in model.parameters())
            seconds, peak = measure(args, model, optimizer, device)
        except Exception as err:  # e.g. out of memory at these sizes: report it, go on
            if streams == 1:
                raise
            print(
                f"variant {name}: failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''})"
            )
        else:
            rows.append((name, streams, seconds, peak))
        del model, optimizer
        common.synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = rows[0][2]
    floor = floor_seconds / base
    dtype = "bf16" if device.type == "cuda" else "fp32"
    print(
        f"{common.bandwidth_header(device, bandwidth, args.copy_mib)}; "
        f"layers={args.layers} hidden={args.hidden} "
        f"heads={args.heads} ffn={args.ffn_hidden or 4 * args.hidden} seq={args.seq} "
        f"micro_batch={args.micro_batch} vocab={args.vocab} dtype={dtype} "
        f"transformer_impl={args.transformer_impl} distributed_optimizer="
        f"{args.distributed_optimizer} mhc_recompute={args.mhc_recompute}; "
        f"parameters {params[rows[0][0]] / 1e6:.1f} M (baseline); "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    print(
        f"floor: (8n+5)*C*2*layers*tokens*bytes = {floor_bytes / 2**30:.2f} GiB per step = "
        f"{floor_seconds * 1e3:.2f} ms = {floor * 100:.2f}% of the baseline step"
    )
    header = ["variant", "n", "step time (ms)", "tokens/s", "overhead", "floor", "overhead / floor"]
    if device.type == "cuda":
        header.append("peak allocated (MiB)")
    table = []
    for name, streams, seconds, peak in rows:
        overhead = seconds / base - 1
        mhc = streams > 1
        row = [
            name,
            streams,
            f"{seconds * 1e3:.1f}",
            f"{tokens_per_step / seconds:.0f}",
            f"{overhead * 100:.1f}%" if mhc else "-",
            f"{floor * 100:.2f}%" if mhc else "-",
            f"{overhead / floor:.2f}" if mhc else "-",
        ]
        if peak is not None:
            row.append(f"{peak / 2**20:.0f}")
        table.append(row)
    common.print_table(header, table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
