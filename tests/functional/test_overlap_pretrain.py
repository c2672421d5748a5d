"""pretrain_gpt_mhc.py with the EP all-to-all overlap (--overlap-moe-expert-parallel-comm,
Megatron's combined 1F1B schedule over the mHC layer's nodes) trains the tiny MoE mHC GPT
(configs/gpt_tiny_moe_mhc.yaml: EP=2 on 2 processes, bf16) bitwise as the plain schedule does."""

from tests.functional.pretrain_runs import run_pretrain

CONFIG = "configs/gpt_tiny_moe_mhc.yaml"
SIX_ITERATIONS = ["--train-iters", "6"]


def test_overlapped_run_has_the_plain_runs_losses_bitwise(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "overlap").mkdir()
    _, plain = run_pretrain(tmp_path / "plain", *SIX_ITERATIONS, config=CONFIG)
    log, overlapped = run_pretrain(
        tmp_path / "overlap", *SIX_ITERATIONS, "--overlap-moe-expert-parallel-comm", config=CONFIG
    )
    assert "overlap_moe_expert_parallel_comm ................ True" in log
    assert sorted(plain) == list(range(1, 7))
    assert overlapped == plain
