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

if __package__:  # imported as bench.activation_memory
    from bench import common
else:  # run as a script (python bench/activation_memory.py puts bench/ on sys.path)
    import common

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
    from megatron_mhc.platform.cpu import CPU_CONFIG_FIELDS

    on_gpu = device.type == "cuda"
    config = MHCTransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        # The local spec without fusions on GPU too: what the CPU runs, so both measure the same.
        **{**CPU_CONFIG_FIELDS, "use_cpu_initialization": not on_gpu},
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
        common.synchronize(device)
        begin = time.perf_counter()
        result = recompute(*hook_args)
        common.synchronize(device)
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

    recompute_times = []  # per step, warm-up steps included

    def step():
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        recompute_times.append(recompute_seconds[0])

    def reset():
        recompute_seconds[0] = 0.0
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak of the last step is reported

    with SavedActivations(model.parameters()) as saved:
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
    saved_bytes = saved.nbytes
    loss.backward()
    del saved, loss

    step_seconds = common.time_call(step, device, args.warmup, args.repeats, setup=reset)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    recompute = statistics.median(recompute_times[args.warmup :])
    return saved_bytes, step_seconds, recompute, peak


def main():
    args = parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    device = common.setup_device("cuda" if torch.cuda.is_available() else "cpu")
    common.init_one_process_model_parallel(device)
    table = []
    for name, streams, recompute in VARIANTS:
        model = build(args, streams, recompute, device)
        saved, seconds, recompute_seconds, peak = measure(args, model, device)
        block = getattr(model.decoder, "recompute_block_size", None)
        del model
        if not table:
            base_saved = saved  # VARIANTS[0] is the baseline
        recompute_cells = ["-", "-"]
        if block:
            recompute_cells = [
                f"{recompute_seconds * 1e3:.1f}",
                f"{recompute_seconds / seconds * 100:.1f}%",
            ]
        table.append(
            [name, block or "-", f"{saved / 2**20:.2f}", f"{saved / base_saved:.3f}x"]
            + [f"{seconds * 1e3:.1f}", *recompute_cells]
            + ([] if peak is None else [f"{peak / 2**20:.1f}"])
        )
    print(
        f"device: {common.device_name(device)}; torch {torch.__version__}; layers={args.layers} "
        f"hidden={args.hidden} heads={args.heads} seq={args.seq} "
        f"micro_batch={args.micro_batch} dropout={args.dropout}; "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    header = [
        "variant",
        "L_r",
        "saved activations (MiB)",
        "vs baseline",
        "step time (ms)",
        "recompute time (ms)",
        "recompute / step",
    ]
    if device.type == "cuda":
        header.append("peak allocated (MiB)")
    common.print_table(header, table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
