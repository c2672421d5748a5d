"""Every replacement of a Megatron name goes through a MegatronPatch: a megatron-core version the
patches are not written for, a name Megatron no longer has, or a function without the parameters
the patch relies on makes the install fail with a message naming the patch, before any name is
replaced. Each mismatch is planted into the real Megatron (and torch) modules, then restored.
"""

import contextlib
import importlib

import pytest
import torch

from megatron_mhc.megatron_patches import (
    SUPPORTED_MEGATRON_CORE,
    MegatronPatch,
    MegatronPatchError,
    check_patches,
)
from tests.dist_utils import run_isolated

UNSUPPORTED_VERSION = "0.18.0"


_ABSENT = object()


@contextlib.contextmanager
def _attribute(owner, name, value):
    """`owner.name` is `value` inside the block (absent when `value` is _ABSENT)."""
    own = name in vars(owner)
    previous = vars(owner).get(name)
    if value is _ABSENT:
        delattr(owner, name)
    else:
        setattr(owner, name, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, previous)
        elif name in vars(owner):
            delattr(owner, name)


def _unrelated_function(*, unrelated=None):
    """A function without any of the parameters a patch relies on."""


@contextlib.contextmanager
def planted(patch: MegatronPatch, mismatch: str):
    """Plant `mismatch` for `patch`: 'version' (an unsupported megatron-core), or 'target' (a
    function without the parameters the patch names, or, for a patch that names none, the name
    missing where the patch replaces it)."""
    if mismatch == "version":
        import megatron.core

        with _attribute(megatron.core, "__version__", UNSUPPORTED_VERSION):
            yield
        return
    owner = patch.owner_object()
    if patch.parameters:
        with _attribute(owner, patch.name, _unrelated_function):
            yield
    elif patch.name in vars(owner):
        with _attribute(owner, patch.name, _ABSENT):
            yield
    else:  # inherited from a base class: a stand-in class without it takes the class's place
        module_name, _, class_name = patch.owner.partition(":")
        stand_in = type(class_name, (), {})
        with _attribute(importlib.import_module(module_name), class_name, stand_in):
            yield


def _expect_patch_named(message: str | None, patch: MegatronPatch, mismatch: str):
    """`message` names the patch, the replaced name and the versions."""
    assert message is not None, f"{patch.target}: planted {mismatch} mismatch did not fail"
    assert f"'{patch.patch}'" in message and patch.target in message, message
    assert ", ".join(SUPPORTED_MEGATRON_CORE) in message, message
    if mismatch == "version":
        assert UNSUPPORTED_VERSION in message, message


def _raised(function) -> str | None:
    try:
        function()
    except MegatronPatchError as err:
        return str(err)
    return None


def _planted_mismatches(patches, install, replaced):
    """For each patch and mismatch: the message with which `install()` failed (None if it did
    not), and whether the names in `replaced` (`(owner, name)`) all kept their values."""
    before = [getattr(owner, name) for owner, name in replaced]
    reports = []
    for patch in patches:
        for mismatch in ("version", "target"):
            with planted(patch, mismatch):
                check_message = _raised(patch.check)
                first_failure = next(filter(None, (_raised(p.check) for p in patches)), None)
                install_message = _raised(install)
            reports.append((patch, mismatch, check_message, install_message == first_failure))
    untouched = all(
        getattr(owner, name) is value for (owner, name), value in zip(replaced, before, strict=True)
    )
    return reports, untouched


def _cpu_platform_and_training_patches_in_a_fresh_process():
    torch.cuda.is_available = lambda: False  # in this fresh process only
    import megatron.core.pipeline_parallel.schedules as schedules
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.transformer.moe import moe_logging
    from megatron.training import initialize, training

    from megatron_mhc import optimizer_patches
    from megatron_mhc.platform import cpu
    from megatron_mhc.training import training_patches

    cpu_reports, cpu_untouched = _planted_mismatches(
        cpu.CPU_PLATFORM_PATCHES,
        cpu.apply_cpu_platform,
        [(torch.cuda, "current_device"), (schedules, "torch"), (training, "initialize_megatron")],
    )
    training_names = [
        (training, "get_forward_backward_func"),
        (training, "build_pretraining_data_loader"),
        (initialize, "_compile_dependencies"),
        (training, "training_log"),
        (training, "load_checkpoint"),
        (moe_logging.MoEMetricsTracker, "report"),
    ]
    training_reports, training_untouched = _planted_mismatches(
        training_patches.TRAINING_PATCHES,
        training_patches.install_training_patches,
        training_names,
    )
    optimizer_names = [
        (optimizer.Float16OptimizerWithFloat16Params, "sharded_state_dict"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "load_state_dict"),
    ]
    optimizer_reports, optimizer_untouched = _planted_mismatches(
        optimizer_patches.OPTIMIZER_PATCHES,
        optimizer_patches.install_optimizer_patches,
        optimizer_names,
    )
    before = [getattr(owner, name) for owner, name in training_names + optimizer_names]
    applied = cpu.apply_cpu_platform()
    training_patches.install_training_patches()
    optimizer_patches.install_optimizer_patches()
    return dict(
        cpu=[(p.target, m, c, i) for p, m, c, i in cpu_reports],
        cpu_untouched=cpu_untouched,
        training=[(p.target, m, c, i) for p, m, c, i in training_reports],
        training_untouched=training_untouched,
        applied=applied,
        optimizer=[(p.target, m, c, i) for p, m, c, i in optimizer_reports],
        optimizer_untouched=optimizer_untouched,
        replaced=[
            getattr(owner, name) is not value
            for (owner, name), value in zip(training_names + optimizer_names, before, strict=True)
        ],
    )


@pytest.fixture(scope="module")
def fresh_process_report():
    return run_isolated(_cpu_platform_and_training_patches_in_a_fresh_process)


def _check_reports(reports, patches):
    assert len(reports) == 2 * len(patches)
    for (target, mismatch, check_message, install_failed_first), patch in zip(
        reports, [p for p in patches for _ in range(2)], strict=True
    ):
        assert target == patch.target
        _expect_patch_named(check_message, patch, mismatch)
        # The install checks every patch before it replaces any: it fails with the first
        # failing check (that of this patch, or of one before it on the same planted name).
        assert install_failed_first, f"{target}: {mismatch} mismatch, install did not fail first"


def test_planted_mismatch_of_each_cpu_platform_patch_fails_naming_it(fresh_process_report):
    from megatron_mhc.platform.cpu import CPU_PLATFORM_PATCHES

    _check_reports(fresh_process_report["cpu"], CPU_PLATFORM_PATCHES)
    assert fresh_process_report["cpu_untouched"], "a failed apply_cpu_platform replaced a name"
    assert fresh_process_report["applied"] is True  # and it applies once nothing is planted


def test_planted_mismatch_of_each_training_patch_fails_naming_it(fresh_process_report):
    from megatron_mhc.training.training_patches import TRAINING_PATCHES

    _check_reports(fresh_process_report["training"], TRAINING_PATCHES)
    assert fresh_process_report["training_untouched"], "a failed install replaced a name"
    assert all(fresh_process_report["replaced"])


def test_planted_mismatch_of_each_optimizer_patch_fails_naming_it(fresh_process_report):
    from megatron_mhc.optimizer_patches import OPTIMIZER_PATCHES

    _check_reports(fresh_process_report["optimizer"], OPTIMIZER_PATCHES)
    assert fresh_process_report["optimizer_untouched"], "a failed install replaced a name"


def test_every_patch_fits_the_installed_megatron_core():
    from megatron_mhc.optimizer_patches import OPTIMIZER_PATCHES
    from megatron_mhc.platform.cpu import CPU_PLATFORM_PATCHES
    from megatron_mhc.training.resume_checks import SCHEDULE_FLAGS
    from megatron_mhc.training.training_patches import TRAINING_PATCHES

    check_patches((*CPU_PLATFORM_PATCHES, *TRAINING_PATCHES, *OPTIMIZER_PATCHES, SCHEDULE_FLAGS))


def _class_swap_sites():
    """Each model-construction call that swaps a Megatron class name (megatron_names.names_in),
    with the Megatron module and name it swaps."""
    from megatron.core import rerun_state_machine
    from megatron.core.models.common import model_chunk_schedule_plan
    from megatron.core.models.gpt import gpt_model
    from megatron.core.models.hybrid import hybrid_model

    from megatron_mhc.models.gpt import MHCGPTModel
    from megatron_mhc.models.hybrid import MHCHybridModel
    from megatron_mhc.training.gpt_step import mhc_config_from_args
    from tests.tiny_gpt import tiny_config

    config = tiny_config(enable_mhc_connections=True, mhc_num_residual_streams=2)
    return [
        (lambda: MHCGPTModel(config), gpt_model, "TransformerBlock"),
        (lambda: MHCGPTModel(config), gpt_model, "MultiTokenPredictionBlock"),
        (
            lambda: MHCGPTModel.build_schedule_plan(object.__new__(MHCGPTModel)),
            model_chunk_schedule_plan,
            "TransformerModelChunkSchedulePlan",
        ),
        (lambda: MHCHybridModel(config), hybrid_model, "MultiTokenPredictionBlock"),
        (_rerun_state_machine_swap, rerun_state_machine, "RerunStateMachine"),
        (
            lambda: mhc_config_from_args(None),
            importlib.import_module("megatron.core.transformer"),
            "MLATransformerConfig",
        ),
    ]


def _rerun_state_machine_swap():
    """The swap pretrain_gpt_mhc.py makes around megatron.training.pretrain."""
    from megatron.core import rerun_state_machine

    from megatron_mhc.megatron_names import names_in
    from megatron_mhc.training.rerun_machine import MHCRerunStateMachine

    with names_in(rerun_state_machine, RerunStateMachine=MHCRerunStateMachine):
        pass


def test_planted_mismatch_of_each_class_swap_fails_naming_it():
    for build, module, name in _class_swap_sites():
        original = getattr(module, name)
        patch = MegatronPatch("class swap", module.__name__, name)
        for planted_as in ("version", "missing", "not a base class"):
            if planted_as == "version":
                plant = planted(patch, "version")
            elif planted_as == "missing":
                plant = _attribute(module, name, _ABSENT)
            else:
                plant = _attribute(module, name, type(name, (), {}))
            with plant:
                message = _raised(build)
            assert message is not None, f"{module.__name__}.{name}: {planted_as} did not fail"
            # A version mismatch fails at the call's first swap, maybe another name of `module`.
            swapped = module.__name__ + ("." if planted_as == "version" else f".{name}")
            assert "mHC class" in message and swapped in message, message
            assert ", ".join(SUPPORTED_MEGATRON_CORE) in message, message
            assert getattr(module, name) is original
