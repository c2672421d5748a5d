#!/usr/bin/env python
"""Pretrain a GPT with manifold-constrained hyper-connections on Megatron's training loop.

    torchrun --nproc-per-node 2 pretrain_gpt_mhc.py --config configs/gpt_tiny_mhc.yaml [flags]

With Megatron's `--hybrid-layer-pattern` (e.g. `*-*-*-*-`; `configs/hybrid_tiny_mhc.yaml`) the
model is a HybridModel, with the same flags and YAML sections.

Everything is megatron.training.pretrain (distributed optimizer, pipeline schedules, torch_dist
checkpoints, logging, rerun state machine); this script supplies the mHC model provider, the GPT
datasets and step, the mHC flags and YAML configs (megatron_mhc.training), and three hooks into
megatron.training's module namespace:
  * its `get_forward_backward_func` sizes the pipeline P2P buffers for the n-stream state;
  * its `training_log` also logs tokens/s and the mHC health figures;
  * its data loaders get their own random generator, so that resuming from a checkpoint draws
    the same dropout masks as the uninterrupted run (on CPU, dropout and a loader without a
    generator share the default generator);
  * initialize_megatron's build of the C++ dataset helpers (`make` in megatron/core/datasets)
    becomes an import of the helpers the megatron-core wheel ships prebuilt, without a Makefile.
Without a CUDA device it applies megatron_mhc.platform.cpu and the flags that keep Megatron off
CUDA-only paths (gloo, local transformer, no fusions), and says so in one log line.
"""

import functools
import importlib
import os
import sys

import torch

from megatron_mhc.platform.cpu import CPU_ENV, CPU_MEGATRON_ARGS, apply_cpu_platform

ON_CPU = not torch.cuda.is_available()
if ON_CPU:
    for _key, _value in CPU_ENV.items():  # read when Megatron imports torch._dynamo
        os.environ.setdefault(_key, _value)

from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import initialize, pretrain, training  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.utils import print_rank_0  # noqa: E402

from megatron_mhc.training import mhc_logging  # noqa: E402
from megatron_mhc.training.gpt_step import (  # noqa: E402
    forward_step,
    model_provider,
    train_valid_test_datasets_provider,
)
from megatron_mhc.training.launch_checks import parse_and_check_arguments  # noqa: E402
from megatron_mhc.training.yaml_config import ConfigError  # noqa: E402
from megatron_mhc.transformer.pipeline_shapes import get_forward_backward_func  # noqa: E402


def _loaders_with_own_generator(build_loader):
    @functools.wraps(build_loader)
    def build(dataset, consumed_samples, *args, **kwargs):
        loader = build_loader(dataset, consumed_samples, *args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(consumed_samples)
        return loader

    return build


def _dataset_helpers_are_prebuilt():
    importlib.import_module("megatron.core.datasets.helpers_cpp")
    torch.distributed.barrier()  # as after Megatron's build


def main():
    if ON_CPU:
        apply_cpu_platform()
        sys.argv[1:1] = CPU_MEGATRON_ARGS  # before the user's flags, which still override them
    training.get_forward_backward_func = get_forward_backward_func
    training.build_pretraining_data_loader = _loaders_with_own_generator(
        training.build_pretraining_data_loader
    )
    initialize._compile_dependencies = _dataset_helpers_are_prebuilt
    mhc_logging.install(training)
    try:
        args, _ = parse_and_check_arguments()
    except (ConfigError, ValueError) as err:
        sys.exit(f"pretrain_gpt_mhc.py: {err}")
    if ON_CPU:
        print_rank_0(
            "megatron-mhc: no CUDA device, running on CPU with gloo: CPU platform applied and "
            f"flags added: {' '.join(CPU_MEGATRON_ARGS)}"
        )
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
