"""mhc_mlp_high_priority_stream: the MLP's HC update on a high-priority CUDA stream gives bitwise
the results of the caller's stream (module alone under concurrent load, and a tiny GPT trained
with the recompute manager); on CPU the platform's ordered streams stand in (the op runs in the
stream's context), and without CUDA or the CPU platform the option is a clear error."""

import pytest
import torch

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.transformer.high_priority_stream import high_priority_stream
from megatron_mhc.transformer.hyper_connection import HyperConnectionModule
from tests.dist_utils import initialize_model_parallel, run_distributed, run_isolated
from tests.tiny_gpt import MHC_4_STREAMS, build_tiny_gpt, tiny_config

CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA GPU (CUDA streams)"


def _high_priority_stream_without_the_cpu_platform():
    from megatron_mhc.transformer.high_priority_stream import mlp_high_priority_stream

    try:
        mlp_high_priority_stream(
            tiny_config(enable_mhc_connections=True, mhc_mlp_high_priority_stream=True)
        )
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.skipif(CUDA, reason="without CUDA only")
def test_without_cuda_or_the_cpu_platform_the_option_is_an_error():
    message = run_isolated(_high_priority_stream_without_the_cpu_platform)
    assert message is not None
    assert "mhc_mlp_high_priority_stream=True needs a CUDA device" in message


def _update_on_the_cpu_stand_in_stream(rank, world_size):
    """The stream the update runs on, and the op's current stream inside `run`."""
    from megatron_mhc.transformer.high_priority_stream import mlp_high_priority_stream

    initialize_model_parallel(1, 1)
    config = tiny_config(enable_mhc_connections=True, mhc_mlp_high_priority_stream=True)
    side = mlp_high_priority_stream(config)
    seen = []

    def op(a):
        seen.append(torch.cpu.current_stream())
        return a * 2

    a = torch.randn(16)
    out = side.run(op, a)
    gpt = build_tiny_gpt(config)
    return (
        seen == [side.stream],
        torch.cpu.current_stream() is not side.stream,
        torch.equal(out, a * 2),
        all(layer.mlp_hyper_connection.update_stream is side for layer in gpt.decoder.layers),
    )


@pytest.mark.skipif(CUDA, reason="without CUDA only")
def test_on_cpu_the_platforms_stand_in_stream_runs_the_update():
    """The CPU platform's ordered streams stand in for CUDA's: the op runs inside the stream's
    context and the caller's stream is back after it (tests/unit/test_mhc_overlap_schedule.py
    trains with it, bitwise)."""
    (result,) = run_distributed(_update_on_the_cpu_stand_in_stream, 1)
    assert result == (True, True, True, True)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
def test_stream_has_the_greatest_priority_and_runs_the_op_on_it():
    side = high_priority_stream(torch.cuda.current_device())
    assert side is high_priority_stream(torch.cuda.current_device())  # one per GPU
    assert side.stream.priority == torch.cuda.Stream.priority_range()[1]
    seen = []

    def op(a):
        seen.append(torch.cuda.current_stream())
        return a * 2

    a = torch.randn(1024, device="cuda")
    out = side.run(op, a)
    assert seen == [side.stream] and torch.cuda.current_stream() != side.stream
    torch.testing.assert_close(out, a * 2, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_on_the_stream_is_bitwise_the_same_under_load(backend):
    config = MHCTransformerConfig(
        num_layers=1,
        hidden_size=1024,
        num_attention_heads=8,
        **MHC_4_STREAMS,
        mhc_kernel_backend=backend,
    )
    torch.manual_seed(0)
    plain = HyperConnectionModule(config, 1)
    side = HyperConnectionModule(
        config, 1, update_stream=high_priority_stream(torch.cuda.current_device())
    )
    side.load_state_dict(plain.state_dict())
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2, 4, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    proj = torch.randn(1024, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    weights = torch.randn_like(x)
    load = torch.randn(4096, 4096, device="cuda", generator=gen)
    busy = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[0])

    def step(module):
        streams = x.clone().requires_grad_()
        with torch.cuda.stream(busy):  # low-priority work competing for the SMs
            for _ in range(8):
                load @ load
        hc = module(streams)
        y = hc.sublayer_input @ proj
        out = module.update(hc.streams, (y, None), hc.h_post, hc.comb, dropout_p=0.0)
        (out.float() * weights).sum().backward()
        torch.cuda.synchronize()
        return [out, streams.grad] + [p.grad for p in module.parameters()]

    for got, want in zip(step(side), step(plain), strict=True):
        assert torch.equal(got, want)


def _cuda_gpt_step(high_priority, recompute, weights=None):
    from tests.tiny_gpt import SEQ, batches, causal_mask, run_schedule

    model = build_tiny_gpt(
        tiny_config(
            **MHC_4_STREAMS,
            num_layers=4,
            hidden_dropout=0.1,
            use_cpu_initialization=False,
            mhc_kernel_backend="triton",
            mhc_mlp_high_priority_stream=high_priority,
            mhc_recompute_layer_num=recompute,
        )
    ).cuda()
    weights = weights if weights is not None else model.state_dict()
    model.load_state_dict(weights)
    mask = causal_mask().cuda()

    def forward_step(data_iterator, model):
        tokens, labels = (t.cuda() for t in next(data_iterator))
        positions = torch.arange(SEQ, device="cuda").expand(tokens.shape[0], SEQ)
        losses = model(tokens, positions, mask, labels=labels)
        return losses, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    torch.manual_seed(5)
    torch.cuda.manual_seed(5)
    losses = run_schedule(model, batches(), forward_step)
    torch.cuda.synchronize()
    loss = torch.stack([x["loss"] for x in losses]).mean()
    return weights, loss, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
def test_tiny_gpt_with_the_stream_and_recompute_is_bitwise_the_same():
    import torch.distributed as dist

    from tests.dist_utils import destroy_model_parallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_model_parallel(1, 1)
        weights, loss, grads = _cuda_gpt_step(False, None)
        for recompute in (None, 2):
            _, got_loss, got_grads = _cuda_gpt_step(True, recompute, weights)
            assert torch.equal(got_loss, loss), recompute
            for name, grad in grads.items():
                assert torch.equal(got_grads[name], grad), (recompute, name)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
