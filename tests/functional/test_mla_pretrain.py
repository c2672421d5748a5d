"""pretrain_gpt_mhc.py with --multi-latent-attention: megatron.training's MLA config keeps the mHC
fields (MHCMLATransformerConfig), and the mHC GPT with MLA trains on 2 pipeline stages."""

import math

from tests.functional.pretrain_runs import run_pretrain

ITERATIONS = 8
MLA_FLAGS = [
    "--multi-latent-attention",
    "--q-lora-rank",
    "32",
    "--kv-lora-rank",
    "32",
    "--qk-head-dim",
    "16",
    "--qk-pos-emb-head-dim",
    "8",
    "--v-head-dim",
    "16",
    "--rope-type",
    "rope",
]


def test_pretrain_with_multi_latent_attention_trains_the_mhc_gpt(tmp_path):
    log, losses = run_pretrain(
        tmp_path, *MLA_FLAGS, "--train-iters", str(ITERATIONS), "--lr-warmup-iters", "2"
    )
    assert "building GPT model: mHC on (n=4" in log
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert losses[ITERATIONS] < losses[1] - 0.5, losses
