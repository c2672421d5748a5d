#!/usr/bin/env python
"""Pretrain a GPT with manifold-constrained hyper-connections on Megatron's training loop.

    torchrun --nproc-per-node 2 pretrain_gpt_mhc.py --config configs/gpt_tiny_mhc.yaml [flags]

With Megatron's `--hybrid-layer-pattern` (e.g. `*-*-*-*-`; `configs/hybrid_tiny_mhc.yaml`) the
model is a HybridModel, with the same flags and YAML sections.

    python pretrain_gpt_mhc.py --config FILE --dry-run [--world-size N] [flags]

checks the launch on N GPUs without starting it, on any machine (megatron_mhc.training.dry_run).

Everything is megatron.training.pretrain (distributed optimizer, pipeline schedules, torch_dist
checkpoints, logging, rerun state machine); this script supplies the mHC model provider, the GPT
datasets and step, the mHC flags and YAML configs (megatron_mhc.training), and the names of
megatron.training it replaces for want of an argument of pretrain (install_training_patches in
megatron_mhc/training/training_patches.py: n-stream pipeline shapes, data loaders with their own
generator, prebuilt dataset helpers, the mHC figures in the training log), and the fixes of
megatron-core's optimizer checkpointing for the fp32 HC parameters (install_optimizer_patches in
megatron_mhc/optimizer_patches.py).
Without a CUDA device it applies megatron_mhc.platform.cpu and the flags that keep Megatron off
CUDA-only paths (gloo, local transformer, no fusions), and says so in one log line.
"""

import os
import sys

import torch

from megatron_mhc.platform.cpu import CPU_ENV, CPU_MEGATRON_ARGS, apply_cpu_platform

ON_CPU = not torch.cuda.is_available()
if ON_CPU:
    for _key, _value in CPU_ENV.items():  # read when Megatron imports torch._dynamo
        os.environ.setdefault(_key, _value)

from megatron.core import rerun_state_machine  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import pretrain  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.utils import print_rank_0  # noqa: E402

from megatron_mhc.megatron_names import names_in  # noqa: E402
from megatron_mhc.optimizer_patches import install_optimizer_patches  # noqa: E402
from megatron_mhc.training import dry_run  # noqa: E402
from megatron_mhc.training.gpt_step import (  # noqa: E402
    forward_step,
    model_provider,
    train_valid_test_datasets_provider,
)
from megatron_mhc.training.launch_checks import (  # noqa: E402
    launch_errors_reported,
    parse_and_check_arguments,
)
from megatron_mhc.training.rerun_machine import MHCRerunStateMachine  # noqa: E402
from megatron_mhc.training.training_patches import install_training_patches  # noqa: E402


def main():
    if "--dry-run" in sys.argv[1:]:  # checked as on GPU machines: no CPU platform or flags
        sys.exit(dry_run.main(sys.argv[1:]))
    if ON_CPU:
        apply_cpu_platform()
        sys.argv[1:1] = CPU_MEGATRON_ARGS  # before the user's flags, which still override them
    install_training_patches()
    install_optimizer_patches()
    with launch_errors_reported():
        args, _ = parse_and_check_arguments()
    if ON_CPU:
        print_rank_0(
            "megatron-mhc: no CUDA device, running on CPU with gloo: CPU platform applied and "
            f"flags added: {' '.join(CPU_MEGATRON_ARGS)}"
        )
    # A NaN on a single machine ends the run once, with the way out (docs/errors.md).
    with names_in(rerun_state_machine, RerunStateMachine=MHCRerunStateMachine):
        pretrain(
            pretrain_cfg_container_from_args(args),
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            model_provider=model_provider,
        )


if __name__ == "__main__":
    main()
