"""pretrain_gpt_mhc.py builds a HybridModel from --hybrid-layer-pattern: the tiny mHC hybrid
config (`*-*E|*-*E`: attention, MLP and MoE layers over two pipeline stages) trains end to end
on CPU (2 gloo processes), with the mHC health lines of every hybrid layer and a falling loss; a
pattern with MoE layers on one pipeline stage only trains too (megatron-core 0.19.2 alone hangs at
its first log). (A pattern the local spec cannot build is refused at launch:
tests/unit/test_launch_errors.py.)"""

import re

from tests.functional.pretrain_runs import run_pretrain

ITERATIONS = 30


def test_tiny_hybrid_mhc_config_trains_with_health_lines(tmp_path):
    log, losses = run_pretrain(
        tmp_path, "--train-iters", str(ITERATIONS), config="configs/hybrid_tiny_mhc.yaml"
    )
    assert "building HybridModel *-*E|*-*E model: mHC on (n=4" in log
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    # num_layers comes from the pattern: one [mhc] line per hybrid layer, across both stages.
    assert all(f"[mhc]   layer{layer:02d}: H_pre" in log for layer in range(1, 9))
    assert "layer09" not in log
    assert "load_balancing_loss" in log  # the MoE layers route tokens
    first, last = losses[1], sum(losses[i] for i in range(ITERATIONS - 4, ITERATIONS + 1)) / 5
    assert last < first - 2.0, losses


def test_moe_layers_on_one_pipeline_stage_only_report_their_metrics(tmp_path):
    # The second stage has no MoE layer: its MoE metrics are created, not recorded, and must
    # match the first stage's for the pipeline all-reduce at each log.
    log, losses = run_pretrain(
        tmp_path,
        *("--hybrid-layer-pattern", "*E|*-", "--train-iters", "2", "--lr-warmup-iters", "1"),
        config="configs/hybrid_tiny_mhc.yaml",
        timeout=180,
    )
    assert sorted(losses) == [1, 2]
    assert len(re.findall(r"iteration +\d+/ +2 \|.*load_balancing_loss: \d", log)) == 2
