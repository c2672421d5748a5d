"""The mHC MTP block against an independent composition of docs/multi_token_prediction.md.

tests/unit/test_mtp.py compares MTP models with each other (layouts, GPT against hybrid, one
stream against Megatron) or uses the identity init, where every stream is equal: feeding the MTP
block the mean of the decoder's streams, or giving it the decoder's head, passes all of them.
Here the HC modules and heads have random, non-uniform parameters, so the decoder's streams
differ, and (float64, one process):

- the MTP block's loss input and the MTP loss equal a straight-line composition of the
  project's reference ops (`megatron_mhc/fusions/reference.py`) and the layer's own norms,
  projections, attention and MLP, following the design's formulas step by step;
- changing the decoder's streams but not their mean (a `mean` contract: the main loss stays)
  changes the MTP loss;
- the MTP head's parameters are its own: the MTP loss alone gives them gradients and none to
  the decoder's learned head.
"""

import pytest
import torch
import torch.nn.functional as F

from tests import dist_utils
from tests.tiny_gpt import (
    FLOAT64,
    MHC_4_STREAMS,
    SEQ,
    batches,
    build_tiny_gpt,
    causal_mask,
    randomize_hc_parameters,
    tiny_config,
)
from tests.unit.test_mtp import _mtp_losses

CONTRACTS = ("mean", "learned")


def _roll(tensor):
    """Megatron's roll_tensor(shifts=-1) along the sequence: one left, the last position 0."""
    return torch.cat([tensor[:, 1:], torch.zeros_like(tensor[:, :1])], dim=1)


def _reference_mtp(model, tokens, labels, decoder_streams):
    """(loss input [s, b, C], MTP loss) of MTP depth 1, composed from the formulas of
    docs/multi_token_prediction.md:

        e         = enorm(embedding(tokens shifted 1))
        Z_i       = e_proj(e) + h_proj(hnorm(X_i))
        X_1       = the MTP's transformer layer on Z (attention and MLP, each with its HC module)
        loss in.  = final_layernorm(mhc_head(X_1))
    """
    from megatron_mhc.fusions import reference

    config = model.config
    layer = model.mtp.layers[0]
    inner = layer.mtp_model_layer
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    embedding = model.embedding(input_ids=_roll(tokens), position_ids=_roll(position_ids))
    e = layer.enorm(embedding)
    x = decoder_streams.unflatten(-1, (config.mhc_num_residual_streams, -1))
    z = F.linear(e, layer.e_proj.weight).unsqueeze(2) + F.linear(
        layer.hnorm(x), layer.h_proj.weight
    )
    rotary_pos_emb = model.rotary_pos_emb(SEQ)

    def attention(u):
        return inner.self_attention(
            inner.input_layernorm(u), attention_mask=causal_mask(), rotary_pos_emb=rotary_pos_emb
        )

    def mlp(u):
        return inner.mlp(inner.pre_mlp_layernorm(u))

    for hc, sublayer in (
        (inner.self_attention_hyper_connection, attention),
        (inner.mlp_hyper_connection, mlp),
    ):
        h_pre, h_post, comb = reference.mhc_mappings(
            z,
            hc.fn,
            hc.base,
            hc.scale,
            config.mhc_sinkhorn_iterations,
            config.mhc_eps,
            config.mhc_norm_eps,
        )
        y, bias = sublayer(reference.mhc_collapse(z, h_pre))
        if bias is not None:
            y = y + bias
        z = reference.mhc_update(z, y, h_post, comb)
    head = layer.mhc_head
    loss_input = layer.final_layernorm(
        reference.mhc_head(z, head.fn, head.base, head.scale, config.mhc_eps, config.mhc_norm_eps)
    )
    logits, _ = model.output_layer(loss_input)
    mtp_labels, loss_mask = _roll(labels), _roll(torch.ones_like(labels))
    losses = F.cross_entropy(
        logits.transpose(0, 1).flatten(0, 1), mtp_labels.flatten(), reduction="none"
    )
    return loss_input, (losses * loss_mask.flatten()).sum() / loss_mask.sum()


def _forward(model, tokens, labels, streams_offset=None):
    """The model's forward in training mode: (mean main loss, MTP loss, the decoder's streams
    before the contract, the MTP block's loss input). `streams_offset` is added to the streams
    before the contract and the MTP block read them."""
    seen = {}

    def streams_in(_norm, args):
        streams = args[0] if streams_offset is None else args[0] + streams_offset
        seen["streams"] = streams
        return (streams, *args[1:])

    def mtp_out(_block, _args, output):
        seen["loss_input"] = output.chunk(2, dim=0)[1]

    hooks = [
        # Registered last with prepend: runs before the model's own pre-hooks on the norm.
        model.decoder.final_layernorm.register_forward_pre_hook(streams_in, prepend=True),
        model.mtp.register_forward_hook(mtp_out),
    ]
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    losses = model(tokens, position_ids, causal_mask(), labels=labels)
    for hook in hooks:
        hook.remove()
    (mtp_loss,) = _mtp_losses()
    return losses, mtp_loss, seen["streams"], seen["loss_input"]


def _checks(rank, world_size, contract):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    torch.set_default_dtype(torch.float64)
    dist_utils.initialize_model_parallel(seed=1234)
    MTPLossLoggingHelper.tracker.clear()
    config = tiny_config(**MHC_4_STREAMS, **FLOAT64, mtp_num_layers=1, mhc_output_contract=contract)
    model = build_tiny_gpt(config)
    randomize_hc_parameters(model, seed=7, base_std=2.0, gating=1.0)
    tokens, labels = batches(seed=4)[0]
    results = {}

    losses, mtp_loss, streams, loss_input = _forward(model, tokens, labels)
    with torch.no_grad():
        reference_input, reference_loss = _reference_mtp(model, tokens, labels, streams)
    per_stream = streams.unflatten(-1, (4, -1))
    spread = (per_stream - per_stream.mean(2, keepdim=True)).abs().max()
    results["streams_spread"] = (spread / per_stream.abs().max()).item()
    results["loss_input"] = (loss_input.detach(), reference_input)
    results["mtp_loss"] = (mtp_loss, reference_loss.item())

    # The MTP loss alone (the main loss's gradient zero; MTPLossAutoScaler still gives the MTP
    # loss its own).
    (losses * 0.0).sum().backward()
    results["grads"] = {
        name: None if param.grad is None else param.grad.abs().max().item()
        for name, param in model.named_parameters()
        if "mhc_head" in name
    }

    # Streams changed, their mean not: offsets summing to zero over the streams.
    offset = torch.randn(per_stream.shape, generator=torch.Generator().manual_seed(9))
    offset = (offset - offset.mean(2, keepdim=True)).flatten(-2)
    with torch.no_grad():
        moved_losses, moved_mtp_loss, _, _ = _forward(model, tokens, labels, offset)
    results["moved"] = (losses.detach(), moved_losses, mtp_loss, moved_mtp_loss)
    return results


@pytest.fixture(scope="module", params=CONTRACTS)
def checked(request):
    return request.param, dist_utils.run_distributed(_checks, 1, request.param)[0]


def test_mtp_block_equals_the_straight_line_reference_with_differing_streams(checked):
    _, results = checked
    # The decoder's streams differ from each other (by a tenth of their largest value or more).
    assert results["streams_spread"] > 0.1, results["streams_spread"]
    got, want = results["loss_input"]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Megatron's cross entropy computes in fp32 whatever the logits' dtype.
    mtp_loss, reference_loss = results["mtp_loss"]
    assert mtp_loss == pytest.approx(reference_loss, rel=1e-6)


def test_changing_the_streams_but_not_their_mean_changes_the_mtp_loss(checked):
    contract, results = checked
    losses, moved_losses, mtp_loss, moved_mtp_loss = results["moved"]
    if contract == "mean":
        # The decoder's output is the mean: the main loss does not move (beyond the rounding of
        # Megatron's fp32 cross entropy).
        torch.testing.assert_close(moved_losses, losses, rtol=1e-6, atol=0)
    # The MTP loss moves by far more than that rounding (the tiny random model's losses are all
    # near log(vocab), so the move is small in absolute terms).
    assert abs(moved_mtp_loss - mtp_loss) > 1e-5 * mtp_loss, (moved_mtp_loss, mtp_loss)


def test_mtp_head_parameters_are_its_own(checked):
    contract, results = checked
    grads = results["grads"]
    mtp_head = {name: grad for name, grad in grads.items() if name.startswith("mtp.")}
    decoder_head = {name: grad for name, grad in grads.items() if name.startswith("decoder.")}
    assert sorted(name.rsplit(".", 1)[1] for name in mtp_head) == ["base", "fn", "scale"]
    # The MTP loss reaches the MTP's head ...
    assert all(grad is not None and grad > 0 for grad in mtp_head.values()), mtp_head
    # ... and not the decoder's (a `learned` contract has one; `mean` has none).
    assert len(decoder_head) == (3 if contract == "learned" else 0)
    assert all(grad is None or grad == 0 for grad in decoder_head.values()), decoder_head
