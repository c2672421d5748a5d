"""Every check of a pretrain_gpt_mhc.py launch that runs before anything is set up or written:
Megatron's argument parsing and validation plus megatron-mhc's own checks. The real launch and
the dry run call the same `parse_and_check_arguments`, so a dry run validates exactly what a
launch would.

The order matters: the mHC fields, the flags users get wrong most, the output directories,
the data and the checkpoint are checked on the parsed values before Megatron's `validate_args`
(whose assertions name no value); the argument list `validate_args` prints is held back until
every check has passed, so that a refusal is the last thing printed; and Megatron's global
state (the TensorBoard writer, which creates its event file, the tokenizer, the batch-size
calculator) is set up only then, so a refused launch writes nothing.
"""

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from megatron.training.arguments import parse_args, validate_args
from megatron.training.checkpointing import load_args_from_checkpoint
from megatron.training.global_vars import set_global_variables

from megatron_mhc.checkpoint_conversion import check_no_legacy_names
from megatron_mhc.config import check_mhc_fields, mhc_active
from megatron_mhc.data.flag_checks import check_data_paths, check_tokenizer_files
from megatron_mhc.fusions import get_backend
from megatron_mhc.training.arguments import add_mhc_arguments
from megatron_mhc.training.checkpoint_checks import (
    check_checkpoint_to_load,
    check_optimizer_state_to_load,
)
from megatron_mhc.training.gpt_step import check_mtp_arguments, mhc_config_from_args
from megatron_mhc.training.megatron_flag_checks import check_megatron_flags
from megatron_mhc.training.output_checks import check_output_directories
from megatron_mhc.training.resume_checks import check_schedule_against_checkpoint
from megatron_mhc.transformer.hybrid_specs import (
    check_hybrid_layer_pattern,
    check_hybrid_layer_symbols,
)

_OTHER_RANKS_EXIT_DELAY_S = 3.0


def parse_and_check_arguments(
    check_data: bool = True, set_globals: bool = True, this_machine: bool = True
):
    """(args, config): the parsed flags and the model config, or ConfigError / ValueError.

    `check_data`: also check that --data-path and the tokenizer's files exist. `set_globals`:
    then set megatron.training's global state (args, tokenizer, TensorBoard writer, ...) as
    `pretrain` expects it. `this_machine`: also check that this machine can run the launch
    (the dry run checks it as on GPU machines).
    """
    args = parse_args(extra_args_provider=add_mhc_arguments)
    if args.yaml_cfg is not None:
        raise ValueError(
            f"--yaml-cfg {args.yaml_cfg}: Megatron's experimental YAML format is not read by "
            "pretrain_gpt_mhc.py; give the file as --config (sections model, mhc, parallel, ...)"
        )
    if args.use_checkpoint_args:
        if args.load is None and args.pretrained_checkpoint is None:
            raise ValueError("--use-checkpoint-args needs --load (or --pretrained-checkpoint)")
        check_checkpoint_to_load(args.load, args.ckpt_step)
        load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        load_args_from_checkpoint(args)
    # The mHC fields on the flags as given, with the conditions of MHCTransformerConfig, and an
    # explicit fused backend that cannot run here, before Megatron's validation.
    check_mhc_fields(args, name=lambda field, value: f"--{field.replace('_', '-')} {value}")
    if mhc_active(args):
        get_backend(args.mhc_kernel_backend)
    if args.hybrid_layer_pattern is not None:
        check_hybrid_layer_symbols(args.hybrid_layer_pattern, args.transformer_impl)
    check_megatron_flags(args)
    if check_data:
        check_data_paths(args.data_path)
        for flag in ("train_data_path", "valid_data_path", "test_data_path"):
            check_data_paths(getattr(args, flag), flag="--" + flag.replace("_", "-"))
        check_tokenizer_files(args)
    check_checkpoint_to_load(args.load, args.ckpt_step)
    check_optimizer_state_to_load(args)
    check_no_legacy_names(args.load)
    check_output_directories(args)
    if this_machine:
        check_runs_on_this_machine(args)
    # Megatron's validation ends by printing every argument (about 870 lines); they are printed
    # once every check below has passed too, so that no refusal comes after them.
    argument_dump = io.StringIO()
    with contextlib.redirect_stdout(argument_dump):
        validate_args(args)
    # The model config (the mHC fields with Megatron's features) and the hybrid layer pattern,
    # before Megatron sets anything up.
    config = mhc_config_from_args(args)
    if args.hybrid_layer_pattern is not None:
        check_hybrid_layer_pattern(config, args.hybrid_layer_pattern)
    check_mtp_arguments(args)
    check_schedule_against_checkpoint(args)
    sys.stdout.write(argument_dump.getvalue())
    if set_globals:
        set_global_variables(args)
    return args, config


def check_runs_on_this_machine(args) -> None:
    """ValueError for what this machine cannot run: fp16 without a CUDA device."""
    if args.fp16 and not torch.cuda.is_available():
        raise ValueError(
            "--fp16 needs a CUDA device: megatron-core's fp16 loss scaler (optimizer/"
            "grad_scaler.py) lives on the GPU; without one train in --bf16 or fp32"
        )


def launch_error_line(err: BaseException) -> str:
    """The one line a refused launch prints: the error's message, or for a bare assertion of
    Megatron's the asserted condition."""
    message = str(err).strip().replace("\n", " ")
    if isinstance(err, AssertionError):
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        message = (
            f"Megatron's check failed ({where}: {frame.line}){': ' + message if message else ''}"
        )
    return f"pretrain_gpt_mhc.py: error: {message}"


def hand_to_torchrun(line: str) -> None:
    """Makes `line` this process's error for torchrun, whose failure summary (printed last)
    then shows it as the cause instead of a hint to enable tracebacks. Nothing outside
    torchrun."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchrun's error-file layout: its summary shows `py_callstack` as the cause.
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)


@contextlib.contextmanager
def launch_errors_reported():
    """Runs the launch checks of the block; a refused launch (argparse's usage errors included,
    raised as arguments.UsageError) prints `launch_error_line` once (rank 0), hands it to
    torchrun as the process's error (so that torchrun's failure summary names it rather than a
    traceback hint) and exits with code 2 on every rank. With MHC_TRACEBACK=1 errors keep their
    traceback."""
    rank = int(os.environ.get("RANK", "0"))
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
    try:
        with quiet:
            yield
        return
    except (ValueError, AssertionError) as err:  # ConfigError is a ValueError
        if os.environ.get("MHC_TRACEBACK") == "1":
            raise
        if rank == 0:
            line = launch_error_line(err)
            print(line, file=sys.stderr, flush=True)
            hand_to_torchrun(line)
        exit_code = 2
    except SystemExit as stop:
        if stop.code in (0, None):  # --help
            raise
        exit_code = stop.code
    if rank:
        # torchrun stops the other processes as soon as one exits: rank 0 prints first.
        time.sleep(_OTHER_RANKS_EXIT_DELAY_S)
    sys.exit(exit_code)
