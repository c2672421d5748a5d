"""Checkpointing the optimizer of a model that keeps some parameters fp32 in bf16 / fp16 training.

The HC parameters stay fp32 in a bf16 / fp16 model (docs/math.md: the mappings are computed from
fp32 weights, as in DeepSeek-V4 and Megatron-LM's `mark_keep_in_fp32`). megatron-core 0.19.2
trains such a model correctly but cannot checkpoint or restore its optimizer state, because its
optimizers assume a parameter group holds one kind of parameter. Each fix below is a fenced
`MegatronPatch` (docs/megatron_patches.md says which upstream change removes it):

1. `Float16OptimizerWithFloat16Params.sharded_state_dict` (non-distributed optimizer, torch_dist
   format). torch numbers the inner optimizer's parameters in group order, where fp32 master
   copies of bf16 parameters and the fp32 parameters themselves are interleaved; 0.19.2 maps
   those numbers to checkpoint entries as if every parameter were a bf16 one, and pairs the
   master copies with every number of a group ("Optimizer shape (128,) does not match model
   shape (512,)"). The replacement maps each number to the model parameter of the inner
   parameter that holds it. Megatron-LM #5929 fixes it upstream.
2. `DistributedOptimizer.__init__` (any format). Each parameter's place in its inner group is
   recorded in grad-buffer order (bf16 and fp32 buffers interleaved) before the groups are
   rebuilt as [fp32 shards..., fp32 copies of bf16 shards...], and never updated, so saving
   reads another parameter's shard. The map is rebuilt from the installed groups, as
   Megatron-LM #5835 does.
3. `DistributedOptimizer._build_model_and_main_param_groups` (load, also in pure fp32). An fp32
   parameter's shard is a view of the parameter itself that is still attached to autograd
   (bf16 shards are detached copies), so loading a checkpoint's values into it fails ("a view
   of a leaf Variable that requires grad is being used in an in-place operation"). The shards
   become detached views of the same memory.
4. `DistributedOptimizer.state_dict` / `load_state_dict` / `_set_main_param_and_optimizer_states`
   without Apex or Transformer Engine (Megatron's own `HAVE_APEX_OR_TE` is false: torch's Adam
   is the inner optimizer). torch's Adam keeps a `step` tensor per parameter, made at its first
   step. 0.19.2 saves one step for all in the parameter groups and asserts there is one, which
   fails before the first step, when Megatron builds the template a checkpoint is loaded into
   (the fully reshardable format); on load it gives every parameter the same step tensor
   (which torch's Adam then increments once per parameter at every step), lets the parameter
   state loaded afterwards bring back the step of a freshly allocated state (0: the next update
   is a first step's), and in the torch format, which saves no step per parameter, fails with
   `KeyError: 'step'`. The step is restored from the groups, one tensor per parameter. With
   Apex's or Transformer Engine's Adam nothing changes.

`install_optimizer_patches()` checks every patch before it makes the first and is idempotent.
"""

import functools
from itertools import chain

import torch

from megatron_mhc.megatron_patches import MegatronPatch, check_patches

_FLOAT16_OPTIMIZER = "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params"
_DISTRIBUTED_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"

SHARDED_STATE_OF_FP32_PARAMS = MegatronPatch(
    "optimizer checkpoint: state ids of fp32 parameters in a bf16/fp16 model",
    _FLOAT16_OPTIMIZER,
    "sharded_state_dict",
    ("model_sharded_state_dict", "is_loading", "metadata"),
)
GROUP_ORDER_AS_INSTALLED = MegatronPatch(
    "optimizer checkpoint: distributed optimizer's group order as installed",
    _DISTRIBUTED_OPTIMIZER,
    "__init__",
    ("optimizer", "model_chunks"),
)
DETACHED_FP32_SHARDS = MegatronPatch(
    "optimizer checkpoint: distributed optimizer's fp32 shards detached",
    _DISTRIBUTED_OPTIMIZER,
    "_build_model_and_main_param_groups",
    ("gbuf_ranges", "param_gbuf_map", "opt_group_ranges", "config"),
)
TORCH_ADAM_STEP_SAVED = MegatronPatch(
    "optimizer checkpoint: torch Adam's step in the distributed optimizer",
    _DISTRIBUTED_OPTIMIZER,
    "state_dict",
    ("self",),
)
TORCH_ADAM_STEP_LOADED = MegatronPatch(
    "optimizer checkpoint: torch Adam's step in the distributed optimizer",
    _DISTRIBUTED_OPTIMIZER,
    "load_state_dict",
    ("state_dict",),
)
TORCH_ADAM_STEP_NOT_COPIED = MegatronPatch(
    "optimizer checkpoint: torch Adam's step in the distributed optimizer",
    _DISTRIBUTED_OPTIMIZER,
    "_set_main_param_and_optimizer_states",
    ("model_param", "tensors"),
)
# The flag the last three patches are keyed on, as Megatron computes it.
_HAVE_APEX_OR_TE = MegatronPatch(
    "optimizer checkpoint: torch Adam's step in the distributed optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "HAVE_APEX_OR_TE",
)

OPTIMIZER_PATCHES = (
    SHARDED_STATE_OF_FP32_PARAMS,
    GROUP_ORDER_AS_INSTALLED,
    DETACHED_FP32_SHARDS,
    TORCH_ADAM_STEP_SAVED,
    TORCH_ADAM_STEP_LOADED,
    TORCH_ADAM_STEP_NOT_COPIED,
    _HAVE_APEX_OR_TE,
)


def _model_params_in_inner_order(optimizer) -> list[torch.nn.Parameter]:
    """The model parameter behind each parameter of the inner optimizer, in torch's numbering
    (group by group): a bf16 parameter for its fp32 master copy, else the parameter itself."""
    model_of_main = {
        id(main): model
        for model_group, main_group in zip(
            optimizer.float16_groups, optimizer.fp32_from_float16_groups, strict=True
        )
        for model, main in zip(model_group, main_group, strict=True)
    }
    return [
        model_of_main.get(id(param), param)
        for group in optimizer.optimizer.param_groups
        for param in group["params"]
    ]


def _sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
    """Float16OptimizerWithFloat16Params.sharded_state_dict with state ids mapped to the model
    parameters they belong to (fp32 parameters included)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    id_to_sharded_param_map = get_param_id_to_sharded_param_map(
        model_sharded_state_dict, _model_params_in_inner_order(self)
    )
    master_copies = {id(p) for p in chain.from_iterable(self.fp32_from_float16_groups)}
    inner_groups = self.optimizer.param_groups
    state_groups = state_dict["optimizer"]["param_groups"]
    # Each group's master copies, paired with the ids of the inner parameters that are copies.
    state_dict["fp32_from_fp16_params"] = [
        [
            make_sharded_optimizer_tensor(
                id_to_sharded_param_map[param_id], fp32_param, prefix="optimizer.state.fp32_param"
            )
            for param_id, fp32_param in zip(
                [
                    param_id
                    for param_id, param in zip(state_group["params"], inner["params"], strict=True)
                    if id(param) in master_copies
                ],
                fp32_group,
                strict=True,
            )
        ]
        for fp32_group, state_group, inner in zip(
            state_dict["fp32_from_fp16_params"], state_groups, inner_groups, strict=True
        )
    ]
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    # Moments have the model parameter's shape; the step is one number for all, saved apart.
    optim_state_to_sharding_state(
        state_dict["optimizer"], id_to_sharded_param_map, exclude_keys="step"
    )
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _group_order_as_installed(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if getattr(self, "is_stub_optimizer", True) or not hasattr(self, "model_fp32_groups"):
            return  # no optimizer, or Megatron-FSDP: no groups of shards
        # The order _build_model_and_main_param_groups installs: fp32 shards first.
        self.model_param_group_index_map = {
            param: (group_index, group_order)
            for group_index, (fp32, float16) in enumerate(
                zip(self.model_fp32_groups, self.model_float16_groups, strict=True)
            )
            for group_order, param in enumerate(fp32 + float16)
        }

    return __init__


def _detached_fp32_shards(build_groups):
    @functools.wraps(build_groups)
    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups = build_groups.__func__(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        shard_fp32_groups = groups[3]
        for group_range, shards in zip(opt_group_ranges, shard_fp32_groups, strict=True):
            detached = {}
            for i, shard in enumerate(shards):
                view = shard.detach()
                view.__dict__.update(shard.__dict__)  # tensor-parallel and optimizer attributes
                detached[id(shard)] = shards[i] = view
            inner = group_range["orig_group"]["params"]
            inner[:] = [detached.get(id(p), p) for p in inner]
        return groups

    return classmethod(build)


def _torch_adam_step_saved(state_dict_fn):
    @functools.wraps(state_dict_fn)
    def state_dict(self):
        from megatron.core.optimizer import distrib_optimizer

        if distrib_optimizer.HAVE_APEX_OR_TE or self.is_stub_optimizer:
            return state_dict_fn(self)
        inner = self.optimizer.state
        if any("step" in param_state for param_state in inner.values()):
            return state_dict_fn(self)
        # Before its first step torch's Adam has no state, so no step, which 0.19.2 requires;
        # Megatron asks for this state dict also as the template of a checkpoint to load.
        # Step 0 for this call.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for param in params:
            inner[param]["step"] = torch.tensor(0.0)
        try:
            return state_dict_fn(self)
        finally:
            for param in params:
                del inner[param]

    return state_dict


def _torch_adam_step_loaded(load_state_dict_fn):
    @functools.wraps(load_state_dict_fn)
    def load_state_dict(self, state_dict):
        from megatron.core.optimizer import distrib_optimizer

        steps = {g.get("step") for g in state_dict.get("optimizer", {}).get("param_groups", [])}
        load_state_dict_fn(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE or self.is_stub_optimizer or len(steps) != 1:
            return
        (step,) = steps
        # The parameter state loaded after the groups brings the step of a freshly allocated
        # state (0) back into every parameter; and torch's Adam increments each parameter's
        # step tensor in place, so each needs its own.
        for param_state in self.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    return load_state_dict


def _step_not_in_saved_state(set_states):
    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        from megatron.core.optimizer import distrib_optimizer

        if not distrib_optimizer.HAVE_APEX_OR_TE and "step" not in tensors:
            # torch's Adam has a `step` tensor per parameter, which Megatron copies like the
            # moments but does not save with them (the torch format); None makes the copy skip
            # it, and load_state_dict restores it from the parameter groups.
            tensors = {**tensors, "step": None}
        return set_states(self, model_param, tensors)

    return _set_main_param_and_optimizer_states


_installed = False


def install_optimizer_patches() -> None:
    """Make the four fixes (module docstring); raises MegatronPatchError, having made none, if
    one does not fit the installed megatron-core. A second call does nothing."""
    global _installed
    if _installed:
        return
    check_patches(OPTIMIZER_PATCHES)
    SHARDED_STATE_OF_FP32_PARAMS.replace(_sharded_state_dict)
    GROUP_ORDER_AS_INSTALLED.wrap(_group_order_as_installed)
    DETACHED_FP32_SHARDS.wrap(_detached_fp32_shards)
    TORCH_ADAM_STEP_SAVED.wrap(_torch_adam_step_saved)
    TORCH_ADAM_STEP_LOADED.wrap(_torch_adam_step_loaded)
    TORCH_ADAM_STEP_NOT_COPIED.wrap(_step_not_in_saved_state)
    _installed = True
