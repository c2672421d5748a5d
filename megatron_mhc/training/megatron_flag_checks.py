"""Megatron's own checks of the flags users get wrong most, restated as one line each.

megatron.training's `validate_args` and the objects it builds later (the batch-size calculator,
the learning-rate scheduler) end these in bare assertions that name no value
(`assert args.hidden_size % args.num_attention_heads == 0`), some of them only after the model
is built. `check_megatron_flags` runs on the freshly parsed flags, before `validate_args`, and
says which flag holds which value and what is allowed instead. The conditions are Megatron
0.19.2's, not stricter: a launch Megatron accepts passes.
"""

from argparse import Namespace


def _divisors(value: int) -> str:
    found = [d for d in range(1, value + 1) if value % d == 0]
    shown = found if len(found) <= 12 else [*found[:6], "...", *found[-3:]]
    return ", ".join(str(d) for d in shown)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_megatron_flags(args: Namespace) -> None:
    """ValueError naming the flag, its value and what is allowed, for the first flag that
    Megatron's validation or set-up would refuse. `args` is the parsed namespace before
    `validate_args` (`args.world_size` is WORLD_SIZE from the environment, as Megatron reads
    it)."""
    _check_required_sizes(args)
    _check_precision(args)
    _check_attention_heads(args)
    _check_parallel_sizes(args)
    _check_expert_parallel_overlap(args)
    _check_pipeline_layers(args)
    _check_sequence_length(args)
    _check_batch_sizes(args)
    _check_schedule(args)
    _check_data_source(args)
    _check_checkpoint_saving(args)


def _check_required_sizes(args) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if name == "num_layers" and (
            args.hybrid_layer_pattern is not None or args.encoder_num_layers is not None
        ):
            continue  # derived from the pattern, or given as --encoder-num-layers
        value = getattr(args, name)
        if value is None:
            raise ValueError(f"{_flag(name)} is required (in the model section of a --config)")
        if value <= 0:
            raise ValueError(f"{_flag(name)} {value}: must be a positive integer")


def _check_precision(args) -> None:
    if args.bf16 and args.fp16:
        raise ValueError(
            "--bf16 and --fp16: give one of them (the model's parameters and activations take "
            "one 16-bit format: bf16 needs no loss scaling, fp16 trains with a loss scale)"
        )


def _check_attention_heads(args) -> None:
    heads, hidden = args.num_attention_heads, args.hidden_size
    if args.kv_channels is None and hidden % heads:
        raise ValueError(
            f"--num-attention-heads {heads} does not divide --hidden-size {hidden}: each head "
            f"gets hidden_size / heads channels, so the heads must be one of {_divisors(hidden)} "
            "(or set --kv-channels)"
        )
    if args.group_query_attention and heads % args.num_query_groups:
        raise ValueError(
            f"--num-query-groups {args.num_query_groups} does not divide --num-attention-heads "
            f"{heads}: allowed {_divisors(heads)}"
        )
    tp = args.tensor_model_parallel_size
    if heads % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {heads}: "
            f"each tensor-parallel rank holds whole heads, so TP must be one of {_divisors(heads)}"
        )


def _model_parallel_size(args) -> int:
    return (
        args.tensor_model_parallel_size
        * args.pipeline_model_parallel_size
        * args.context_parallel_size
    )


def _check_parallel_sizes(args) -> None:
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "expert_model_parallel_size",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} {getattr(args, name)}: must be >= 1")
    model_parallel = _model_parallel_size(args)
    if args.world_size % model_parallel:
        raise ValueError(
            f"{args.world_size} processes (WORLD_SIZE, e.g. torchrun --nproc-per-node) cannot be "
            f"split into groups of --tensor-model-parallel-size {args.tensor_model_parallel_size} "
            f"x --pipeline-model-parallel-size {args.pipeline_model_parallel_size} x "
            f"--context-parallel-size {args.context_parallel_size} = {model_parallel}: the "
            "number of processes must be a multiple of it"
        )
    ep = args.expert_model_parallel_size
    if ep > 1 and args.num_experts is None:
        raise ValueError(
            f"--expert-model-parallel-size {ep} needs a mixture-of-experts model (--num-experts)"
        )
    if args.num_experts is not None and args.num_experts % ep:
        raise ValueError(
            f"--expert-model-parallel-size {ep} does not divide --num-experts "
            f"{args.num_experts}: allowed {_divisors(args.num_experts)}"
        )


def _check_expert_parallel_overlap(args) -> None:
    """The conditions of TransformerConfig on overlap_moe_expert_parallel_comm that need no
    derived setting (it asserts them once the model config is built, and for a dense model
    first asks for virtual pipeline stages, never saying that there is no all-to-all to
    overlap); its pipeline and recompute conditions stay its own."""
    if not args.overlap_moe_expert_parallel_comm:
        return
    flag = "--overlap-moe-expert-parallel-comm"
    if args.num_experts is None:
        raise ValueError(
            f"{flag} overlaps the expert-parallel all-to-all of a mixture-of-experts model with "
            "computation, and this model has no experts (--num-experts is not set): remove the "
            "flag, or give --num-experts and --expert-model-parallel-size > 1"
        )
    ep = args.expert_model_parallel_size
    if ep <= 1:
        raise ValueError(
            f"{flag} needs expert parallelism (--expert-model-parallel-size > 1, got {ep}): "
            "without it there is no all-to-all to overlap"
        )
    if args.moe_token_dispatcher_type not in ("alltoall", "flex"):
        raise ValueError(
            f"{flag} with --moe-token-dispatcher-type {args.moe_token_dispatcher_type}: the "
            "overlap needs the alltoall or flex dispatcher"
        )
    if not (args.bf16 or args.fp16):
        raise ValueError(f"{flag} needs a 16-bit model: add --bf16 (or --fp16)")


def _check_pipeline_layers(args) -> None:
    pp = args.pipeline_model_parallel_size
    uneven = (
        args.decoder_first_pipeline_num_layers is not None
        or args.decoder_last_pipeline_num_layers is not None
        or args.pipeline_model_parallel_layout is not None
        or args.hybrid_layer_pattern is not None
    )
    if uneven:
        return
    layers = args.num_layers if args.num_layers is not None else args.encoder_num_layers
    extra = int(args.account_for_embedding_in_pipeline_split) + int(
        args.account_for_loss_in_pipeline_split
    )
    counted = layers + extra
    counted_text = f"--num-layers {layers}" + (f" (+{extra} for embedding/loss)" if extra else "")
    if counted % pp:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} does not divide {counted_text}: every stage "
            f"holds the same number of layers, so PP must be one of {_divisors(counted)} (or "
            "give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers)"
        )
    per_stage = counted // pp
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    vpp = args.num_virtual_stages_per_pipeline_rank
    if per_virtual is not None and per_stage % per_virtual:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage {per_virtual} does not divide the "
            f"{per_stage} layers of each pipeline stage ({counted_text} / PP {pp}): allowed "
            f"{_divisors(per_stage)}"
        )
    if vpp is not None and per_stage % vpp:
        raise ValueError(
            f"--num-virtual-stages-per-pipeline-rank {vpp} does not divide the {per_stage} "
            f"layers of each pipeline stage ({counted_text} / PP {pp}): allowed "
            f"{_divisors(per_stage)}"
        )
    virtual = vpp if vpp is not None else (per_stage // per_virtual if per_virtual else None)
    if virtual is not None and virtual > 1:
        needed = 2 if args.overlap_p2p_comm else 3
        if pp < needed:
            raise ValueError(
                f"virtual pipeline stages ({virtual} per rank) with --pipeline-model-parallel-"
                f"size {pp}: the interleaved schedule needs PP >= {needed}"
                + ("" if args.overlap_p2p_comm else " without P2P overlap")
            )


def _check_sequence_length(args) -> None:
    seq, max_pos = args.seq_length, args.max_position_embeddings
    if seq is not None and seq > max_pos:
        raise ValueError(
            f"--seq-length {seq} is longer than --max-position-embeddings {max_pos}: raise "
            f"--max-position-embeddings to at least {seq}"
        )
    cp = args.context_parallel_size
    if seq is not None and cp > 1 and seq % (2 * cp):
        raise ValueError(
            f"--seq-length {seq} with --context-parallel-size {cp}: the sequence length must be "
            f"a multiple of 2 x CP = {2 * cp}"
        )


def _check_batch_sizes(args) -> None:
    micro, global_ = args.micro_batch_size, args.global_batch_size
    if micro is None or micro < 1:
        raise ValueError(f"--micro-batch-size {micro}: must be a positive integer")
    if global_ is None:
        return  # Megatron sets it to micro x data-parallel size
    if global_ < 1:
        raise ValueError(f"--global-batch-size {global_}: must be a positive integer")
    dp = args.world_size // _model_parallel_size(args)
    if global_ % (micro * dp) and not args.decrease_batch_size_if_needed:
        nearest = micro * dp * max(1, global_ // (micro * dp))
        raise ValueError(
            f"--global-batch-size {global_} is not a multiple of --micro-batch-size {micro} x "
            f"data-parallel size {dp} (= {args.world_size} processes / TP x PP x CP) = "
            f"{micro * dp}: each step runs a whole number of micro-batches on every "
            f"data-parallel rank (e.g. --global-batch-size {nearest})"
        )


def _check_schedule(args) -> None:
    if args.skip_train:
        return
    if args.train_iters is not None and args.train_samples is not None:
        raise ValueError(
            f"--train-iters {args.train_iters} and --train-samples {args.train_samples}: give "
            "one of them"
        )
    if args.train_iters is None and args.train_samples is None:
        raise ValueError("no training length: give --train-iters N (or --train-samples N)")
    unit = "iters" if args.train_iters is not None else "samples"
    length = args.train_iters if unit == "iters" else args.train_samples
    if length <= 0:
        raise ValueError(f"--train-{unit} {length}: must be a positive integer")
    decay = getattr(args, f"lr_decay_{unit}")
    decay_text = f"--lr-decay-{unit} {decay}" if decay is not None else f"--train-{unit} {length}"
    decay = length if decay is None else decay
    warmup = getattr(args, f"lr_warmup_{unit}")
    if args.lr_warmup_fraction is not None:
        if not 0 <= args.lr_warmup_fraction < 1:
            raise ValueError(
                f"--lr-warmup-fraction {args.lr_warmup_fraction}: must be in [0, 1) (a share of "
                f"the decay {unit})"
            )
    elif warmup >= decay:
        raise ValueError(
            f"--lr-warmup-{unit} {warmup} is not below the decay length ({decay_text}): the "
            f"warm-up must end before the decay does; allowed 0 .. {decay - 1}"
        )
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr {args.lr}: must be positive")
    if args.lr is not None and args.min_lr > args.lr:
        raise ValueError(
            f"--min-lr {args.min_lr} is above --lr {args.lr}: the decay ends at --min-lr, "
            f"allowed 0 .. {args.lr}"
        )


def _check_data_source(args) -> None:
    if args.skip_train:
        return
    per_split = any([args.train_data_path, args.valid_data_path, args.test_data_path])
    given = [
        name
        for name, on in (
            ("--mock-data", args.mock_data),
            ("--data-path", bool(args.data_path)),
            ("--train-data-path/--valid-data-path/--test-data-path", per_split),
        )
        if on
    ]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give one data source")
    if not given and not args.default_corpus and args.data_args_path is None:
        raise ValueError(
            "no training data: give --data-path PREFIX (a dataset written by "
            "tools/preprocess_data.py), --default-corpus (the embedded corpus) or --mock-data"
        )


def _check_checkpoint_saving(args) -> None:
    if args.save is None:
        return
    if args.save_interval is None or args.save_interval <= 0:
        raise ValueError(
            f"--save {args.save} needs --save-interval N (N > 0 iterations between checkpoints)"
            + ("" if args.save_interval is None else f", got {args.save_interval}")
        )
