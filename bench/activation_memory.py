"""Activation memory of mHC with and without the recompute manager.

For one training step of a 12-layer GPT (one micro-batch), counts exactly the bytes of the
activations saved for backward (saved-tensor hooks, each storage counted once, read at the end
of the forward pass so that freed storages count as freed; parameters excluded), and times the
forward+backward step (median of --repeats after --warmup) and the time the recompute manager
spends recomputing stream states inside it (its backward hooks, timed where they run). On a GPU
it also reports the peak allocated memory of the step and times with CUDA events.

    python bench/activation_memory.py [--layers 12 --hidden 512 --heads 8 --seq 256 --micro-batch 2]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

VARIANTS = [  # (name, mHC streams, recompute_layer_num)
    ("baseline (n=1)", 1, None),
    ("mHC n=4, no recompute", 4, None),
    ("mHC n=4, L_r=1", 4, 1),
    ("mHC n=4, L_r=2", 4, 2),
    ("mHC n=4, L_r=4", 4, 4),
    ("mHC n=4, L_r=auto", 4, "auto"),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def build(args, streams, recompute, device):
    from megatron_mhc.config import MHCTransformerConfig
    from megatron_mhc.models.gpt import build_mhc_gpt_model

    on_gpu = device.type == "cuda"
    config = MHCTransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        use_cpu_initialization=not on_gpu,
        transformer_impl="local",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        enable_mhc_connections=streams > 1,
        mhc_num_residual_streams=streams,
        mhc_recompute_layer_num=recompute,
        mhc_kernel_backend="torch",
    )
    torch.manual_seed(0)
    return build_mhc_gpt_model(
        config,
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
    ).to(device)


def _time_recompute(manager, device, spent):
    """Wrap the manager's recompute hook to add its wall time to spent[0] (the extra forward
    work the recompute costs, measured where it happens)."""
    recompute = manager._recompute

    def timed(*hook_args):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        result = recompute(*hook_args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - begin
        return result

    manager._recompute = timed


def measure(args, model, device):
    from megatron_mhc.activation_memory import SavedActivations

    recompute_seconds = [0.0]
    if getattr(model.decoder, "recompute_manager", None) is not None:
        _time_recompute(model.decoder.recompute_manager, device, recompute_seconds)

    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).expand(args.micro_batch, -1)
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=device), 1)[
        None, None
    ]

    def step():
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()

    with SavedActivations(model.parameters()) as saved:
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
    saved_bytes = saved.nbytes
    loss.backward()
    del saved, loss

    times, recompute_times = [], []
    for i in range(args.warmup + args.repeats):
        recompute_seconds[0] = 0.0
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            step()
            elapsed = time.perf_counter() - begin
        if i >= args.warmup:
            times.append(elapsed)
            recompute_times.append(recompute_seconds[0])
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return saved_bytes, statistics.median(times), statistics.median(recompute_times), peak


def main():
    args = parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if not torch.cuda.is_available():
        from megatron_mhc.platform.cpu import apply_cpu_platform

        apply_cpu_platform()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = dist.HashStore()  # one process: no rendezvous port to collide on
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1
    )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    rows = []
    for name, streams, recompute in VARIANTS:
        model = build(args, streams, recompute, device)
        saved, seconds, recompute, peak = measure(args, model, device)
        block = getattr(model.decoder, "recompute_block_size", None)
        rows.append((name, block, saved, seconds, recompute, peak))
        del model
    base_saved = rows[0][2]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"device: {device_name}; torch {torch.__version__}; layers={args.layers} "
        f"hidden={args.hidden} heads={args.heads} seq={args.seq} "
        f"micro_batch={args.micro_batch} dropout={args.dropout}; "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    header = (
        "| variant | L_r | saved activations (MiB) | vs baseline | step time (ms) "
        "| recompute time (ms) | recompute / step |"
    )
    if device.type == "cuda":
        header += " peak allocated (MiB) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, block, saved, seconds, recompute, peak in rows:
        cost = f"{recompute * 1e3:.1f} | {recompute / seconds * 100:.1f}%" if block else "- | -"
        line = (
            f"| {name} | {block or '-'} | {saved / 2**20:.2f} | {saved / base_saved:.3f}x | "
            f"{seconds * 1e3:.1f} | {cost} |"
        )
        if peak is not None:
            line += f" {peak / 2**20:.1f} |"
        print(line)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
