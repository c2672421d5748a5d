"""State-dict conversion to and from Megatron-LM main's native mHC: lossless both ways, and the
converted parameters give main's formulas the mappings of this project's reference ops (main
applies its residual matrix as H @ X, this project as K^T @ X)."""

import pytest
import torch

from megatron_mhc.checkpoint_conversion import from_megatron_main, to_megatron_main, upgrade_key
from megatron_mhc.fusions import reference

N, C, LAYERS = 4, 8, 3
SLOTS = ("self_attention_hyper_connection", "mlp_hyper_connection")


def _hc_state(generator, prefix="decoder.layers."):
    """HC entries as torch_dist stores them: layers stacked along a leading axis."""
    state = {}
    for slot in SLOTS:
        state[f"{prefix}{slot}.fn"] = torch.randn(LAYERS, N * N + 2 * N, N * C, generator=generator)
        state[f"{prefix}{slot}.base"] = torch.randn(LAYERS, N * N + 2 * N, generator=generator)
        state[f"{prefix}{slot}.scale"] = torch.rand(LAYERS, 3, generator=generator)
    return state


def test_round_trip_through_megatron_main_names_is_lossless():
    generator = torch.Generator().manual_seed(0)
    state = _hc_state(generator)
    state.update(_hc_state(generator, prefix="optimizer.state.exp_avg.decoder.layers."))
    state["decoder.final_layernorm.weight"] = torch.ones(C)
    main = to_megatron_main(state, N)
    assert "decoder.layers.mlp_hyper_connection.mapping_proj.weight" in main
    assert "optimizer.state.exp_avg.decoder.layers.mlp_hyper_connection.alpha_res" in main
    assert main["decoder.layers.mlp_hyper_connection.alpha_pre"].shape == (LAYERS, 1)
    assert not any(key.endswith((".fn", ".base", ".scale")) for key in main)
    back = from_megatron_main(main, N)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_learned_head_is_refused_for_megatron_main():
    with pytest.raises(ValueError, match="no learned output contract"):
        to_megatron_main({"decoder.mhc_head.fn": torch.zeros(N, N * C)}, N)


def test_earlier_hc_names_upgrade_to_megatron_slot_names():
    assert upgrade_key("decoder.layers.self_attention_hc.fn") == (
        "decoder.layers.self_attention_hyper_connection.fn"
    )
    assert upgrade_key("optimizer.state.exp_avg.decoder.layers.mlp_hc.scale") == (
        "optimizer.state.exp_avg.decoder.layers.mlp_hyper_connection.scale"
    )
    assert upgrade_key("decoder.layers.mlp.linear_fc1.weight") == (
        "decoder.layers.mlp.linear_fc1.weight"
    )


def _megatron_main_logits(x, mapping_proj_weight, bias, alpha_pre, alpha_post, alpha_res, norm_eps):
    """Megatron-LM main's mapping logits (its HyperConnectionModule._compute_h, as documented):
    h = r * (W x) * alpha + bias with r = 1 / (||x|| / sqrt(nC) + eps)."""
    r = 1.0 / (x.norm(dim=-1, keepdim=True) / (x.shape[-1] ** 0.5) + norm_eps)
    alpha = torch.cat([alpha_pre.expand(N), alpha_post.expand(N), alpha_res.expand(N * N)])
    return r * (x @ mapping_proj_weight.T) * alpha + bias


def _megatron_main_sinkhorn(logits, iterations):
    """Main's Sinkhorn-Knopp: exp, then `iterations` x (rows, then columns)."""
    m = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    for _ in range(iterations):
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        m = m / m.sum(dim=-2, keepdim=True).clamp(min=1e-6)
    return m


def test_converted_parameters_give_main_the_same_mappings():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, N, C, generator=generator, dtype=torch.float64)
    fn = torch.randn(N * N + 2 * N, N * C, generator=generator, dtype=torch.float64) * 0.1
    base = torch.randn(N * N + 2 * N, generator=generator, dtype=torch.float64)
    scale = torch.rand(3, generator=generator, dtype=torch.float64)
    main = to_megatron_main(
        {
            "l.mlp_hyper_connection.fn": fn,
            "l.mlp_hyper_connection.base": base,
            "l.mlp_hyper_connection.scale": scale,
        },
        N,
    )
    main = {
        key.removeprefix("l.mlp_hyper_connection.").replace(".", "_"): value
        for key, value in main.items()
    }
    logits = _megatron_main_logits(x.flatten(-2), **main, norm_eps=0.0)
    h_pre, h_post, _ = reference.mhc_mappings(
        x, fn, base, scale, sinkhorn_iters=1, eps=0.0, norm_eps=1e-300
    )
    # Same pre and post gates (main has no eps on H_pre; eps = 0 here on both sides).
    torch.testing.assert_close(torch.sigmoid(logits[:, :N]), h_pre, rtol=1e-12, atol=0)
    torch.testing.assert_close(2 * torch.sigmoid(logits[:, N : 2 * N]), h_post, rtol=1e-12, atol=0)
    # The residual mixing: main's H applied as H @ X must act like this project's K^T @ X. Both
    # Sinkhorn orders converge to the same doubly stochastic matrix, compared here converged.
    *_, comb = reference.mhc_mappings(
        x, fn, base, scale, sinkhorn_iters=500, eps=0.0, norm_eps=1e-300
    )
    h_res = _megatron_main_sinkhorn(logits[:, 2 * N :].unflatten(-1, (N, N)), 500)
    torch.testing.assert_close(h_res @ x, comb.transpose(-1, -2) @ x, rtol=1e-10, atol=1e-12)
