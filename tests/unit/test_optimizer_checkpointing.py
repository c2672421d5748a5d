"""The optimizer state of a bf16 mHC model, whose HC parameters stay fp32, maps to the right
parameters for checkpointing (megatron_mhc/optimizer_patches.py), on 2 gloo ranks (DP=2) with
Megatron's real DDP, optimizers and sharded state dicts; and the HC parameters keep their fp32
values when the model is cast to bf16 / fp16. The end-to-end resumes of pretrain_gpt_mhc.py are
tests/functional/test_optimizer_resume.py."""

import pytest
import torch

from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.tiny_gpt import (
    MHC_4_STREAMS,
    batches,
    build_tiny_gpt,
    forward_backward,
    megatron_training,
    tiny_config,
    train_step,
)

BF16 = dict(**MHC_4_STREAMS, bf16=True, pipeline_dtype=torch.bfloat16)
STEPS = 2


def _trained(distributed_optimizer: bool):
    from megatron_mhc.optimizer_patches import install_optimizer_patches

    install_optimizer_patches()
    initialize_model_parallel()
    gpt = build_tiny_gpt(tiny_config(**BF16))
    model, optimizer = megatron_training(
        gpt, gpt.config, bf16=True, distributed_optimizer=distributed_optimizer
    )
    data = batches(seed=3)
    for _ in range(STEPS):
        train_step(model, optimizer, lambda m: forward_backward(m, data))
    return model, optimizer, data


def _inner(optimizer):
    """The optimizer that holds the state: megatron's ChainedOptimizer wraps one here."""
    (inner,) = optimizer.chained_optimizers
    return inner


def _distributed_optimizer_state(rank, world_size):
    model, chained, data = _trained(distributed_optimizer=True)
    optimizer = _inner(chained)
    names = {p: n for n, p in model.named_parameters()}
    fp32_names, mismatched = [], []
    for param in optimizer.model_param_group_index_map:
        shard = optimizer._get_model_param_range_map(param)["param"]
        main = optimizer._get_main_param_and_optimizer_states(param)["param"]
        own = param.detach().view(-1)[shard.start : shard.end].float()
        # The fp32 main weights of a bf16 parameter round to it; an fp32 one is itself.
        if main.shape != own.shape or not torch.equal(main.to(param.dtype).float(), own):
            mismatched.append(names[param])
        if param.dtype == torch.float32:
            fp32_names.append(names[param])
            # Loading writes into the fp32 shards (which are views of the parameters).
            states = optimizer._get_main_param_and_optimizer_states(param)
            optimizer._set_main_param_and_optimizer_states(
                param, {k: v.clone() for k, v in states.items()}
            )
    # A round trip of the optimizer's groups, then one more step: every parameter has its own
    # step, incremented once.
    optimizer.load_state_dict(optimizer.state_dict())
    train_step(model, chained, lambda m: forward_backward(m, data))
    steps = [state["step"] for state in optimizer.optimizer.state.values()]
    return dict(
        fp32=fp32_names,
        mismatched=mismatched,
        steps=sorted({float(s) for s in steps}),
        distinct_step_tensors=len({id(s) for s in steps}) == len(steps),
    )


def _float16_optimizer_sharded_state(rank, world_size):
    model, chained, _ = _trained(distributed_optimizer=False)
    optimizer = _inner(chained)
    model_state = model.sharded_state_dict()
    sharded = optimizer.sharded_state_dict(model_state)
    keys_of = {id(t.data): t.key for t in _sharded_tensors(model_state) if hasattr(t, "data")}
    inner_params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    model_param = {
        id(m): p
        for g, mg in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups, strict=True)
        for p, m in zip(g, mg, strict=True)
    }
    wrong = []
    for param_id, state in sharded["optimizer"]["state"].items():
        if param_id == "common_step":
            continue
        owner = model_param.get(id(inner_params[param_id]), inner_params[param_id])
        for name, tensor in state.items():
            if tensor.key != f"optimizer.state.{name}.{keys_of[id(owner)]}":
                wrong.append((param_id, name, tensor.key))
            if tensor.data is not optimizer.optimizer.state[inner_params[param_id]][name]:
                wrong.append((param_id, name, "data"))
    fp32_params = sum(p.dtype == torch.float32 for p in inner_params if id(p) not in model_param)
    return dict(wrong=wrong, fp32_params=fp32_params, states=len(sharded["optimizer"]["state"]))


def _sharded_tensors(state):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return list(nested_values(state))


@pytest.fixture(scope="module")
def distributed_state():
    return run_distributed(_distributed_optimizer_state, 2)


def test_distributed_optimizer_finds_each_parameters_own_shard_fp32_ones_included(
    distributed_state,
):
    for report in distributed_state:
        assert any("hyper_connection" in name for name in report["fp32"])
        assert report["mismatched"] == []


def test_distributed_optimizer_with_torch_adam_keeps_one_step_per_parameter(distributed_state):
    for report in distributed_state:
        assert report["steps"] == [STEPS + 1.0]
        assert report["distinct_step_tensors"]


def test_float16_optimizer_maps_every_state_to_its_own_parameter_fp32_ones_included():
    for report in run_distributed(_float16_optimizer_sharded_state, 2):
        assert report["fp32_params"] > 0 and report["states"] > report["fp32_params"]
        assert report["wrong"] == []


def _hc_values_after_cast(rank, world_size, dtype):
    from megatron.core.transformer.module import Float16Module

    initialize_model_parallel()
    precision = dict(bf16=True) if dtype is torch.bfloat16 else dict(fp16=True)
    config = tiny_config(**MHC_4_STREAMS, **precision, pipeline_dtype=dtype)
    gpt = build_tiny_gpt(config)
    with torch.no_grad():  # not the defaults (base 0, scale 0.01), which bf16 holds exactly
        for name, param in gpt.named_parameters():
            if "hyper_connection" in name:
                param.copy_(torch.randn_like(param))
    initial = {n: p.detach().clone() for n, p in gpt.named_parameters() if "hyper_connection" in n}
    wrapped = Float16Module(config, gpt)
    after = {n: p for n, p in wrapped.module.named_parameters() if n in initial}
    others = {p.dtype for n, p in wrapped.module.named_parameters() if n not in initial}
    return initial, after, others


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hc_parameters_keep_their_fp32_values_when_the_model_is_cast(dtype):
    (result,) = run_distributed(_hc_values_after_cast, 1, dtype)
    initial, after, others = result
    assert others == {dtype}  # the rest of the model was cast
    assert initial.keys() == after.keys() and initial
    for name, value in initial.items():
        assert after[name].dtype == torch.float32, name
        assert torch.equal(after[name], value), name
