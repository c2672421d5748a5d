"""YAML run configs against Megatron's real argument parser (conftest.py):
every shipped config loads, a baseline twin is its mHC config with the plain residual, a file
overrides the base file it names, flags on the command line override the file, and mistakes are
errors naming the key (and the closest valid one)."""

from pathlib import Path

import pytest

from megatron_mhc.training.yaml_config import ConfigError, load_yaml_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _resolved(parser, path):
    """Every flag's value when pretrain_gpt_mhc.py runs with `--config path` and no other flag."""
    parser.set_defaults(**load_yaml_config(str(path), parser))
    return vars(parser.parse_args([]))


def test_shipped_configs_are_valid(parser):
    names = {p.stem for p in CONFIGS}
    assert {
        "gpt_tiny_mhc",
        "gpt_tiny_baseline",
        "mhc_moe_3b",
        "mhc_moe_9b",
        "mhc_moe_27b",
        "gpt_1p3b_mhc",
        "gpt_1p3b_baseline",
        "hybrid_tiny_mhc",
        "mhc_hybrid_moe_27b",
    } <= names
    for path in CONFIGS:
        values = load_yaml_config(str(path), parser)
        # A HybridModel's layers come from its pattern (megatron.training derives num_layers).
        assert ("num_layers" in values) != ("hybrid_layer_pattern" in values), path.name
        assert "enable_mhc_connections" in values, path.name
        # Every run checkpoints its whole training state, optimizer included.
        assert not values.get("no_save_optim"), path.name


def test_paper_hybrid_config_is_the_27b_moe_one_sublayer_per_layer(parser):
    from megatron.core.models.hybrid.hybrid_layer_allocation import (
        get_hybrid_layer_counts,
        get_hybrid_total_pipeline_segment_count,
    )

    gpt = load_yaml_config(str(CONFIGS[0].parent / "mhc_moe_27b.yaml"), parser)
    hybrid = load_yaml_config(str(CONFIGS[0].parent / "mhc_hybrid_moe_27b.yaml"), parser)
    pattern = hybrid.pop("hybrid_layer_pattern")
    counts = get_hybrid_layer_counts(pattern)
    assert (counts["*"], counts.get("-", 0), counts["E"]) == (30, 0, 30)  # all blocks MoE
    # Two virtual stages per pipeline rank: the EP all-to-all overlap, on in the hybrid form,
    # needs them with pipeline parallelism (the GPT form's 30 layers do not split evenly).
    pipeline = hybrid["pipeline_model_parallel_size"]
    assert get_hybrid_total_pipeline_segment_count(pattern) == 2 * pipeline
    different = {key for key in gpt.keys() | hybrid.keys() if gpt.get(key) != hybrid.get(key)}
    # The GPT form cuts its 7/8/8/7 stages with flags, the hybrid one with '|' in its pattern.
    stage_cut = {"decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"}
    renamed = {"num_layers", "save", "load", "tensorboard_dir"}
    assert different == renamed | stage_cut | {"overlap_moe_expert_parallel_comm"}
    assert hybrid["overlap_moe_expert_parallel_comm"] is True
    assert (gpt["decoder_first_pipeline_num_layers"], gpt["decoder_last_pipeline_num_layers"]) == (
        7,
        7,
    )
    # Rank r holds pattern stages r and r + PP: 7/8/8/7 blocks per rank, as the GPT form.
    stages = pattern.split("|")
    blocks = [(len(stages[r]) + len(stages[r + pipeline])) // 2 for r in range(pipeline)]
    assert blocks == [7, 8, 8, 7]


def test_paper_moe_configs_follow_table_5(parser):
    for name, layers, hidden, experts in [
        ("mhc_moe_3b", 12, 1280, 64),
        ("mhc_moe_9b", 18, 1920, 64),
        ("mhc_moe_27b", 30, 2560, 72),
    ]:
        values = load_yaml_config(str(CONFIGS[0].parent / f"{name}.yaml"), parser)
        assert (values["num_layers"], values["hidden_size"], values["num_experts"]) == (
            layers,
            hidden,
            experts,
        )
        assert values["mhc_num_residual_streams"] == 4
        assert values["mhc_init_gating_factor"] == 0.01
        assert values["mhc_sinkhorn_iterations"] == 20
        assert values["seq_length"] == 4096


@pytest.mark.parametrize(
    "mhc,baseline,also_different",
    [
        ("gpt_tiny_mhc", "gpt_tiny_baseline", set()),
        # The baseline has no n-stream states to recompute.
        ("gpt_1p3b_mhc", "gpt_1p3b_baseline", {"mhc_recompute_layer_num"}),
    ],
)
def test_baseline_twin_is_its_mhc_config_with_the_plain_residual(
    make_parser, mhc, baseline, also_different
):
    assert "base:" in (CONFIGS[0].parent / f"{baseline}.yaml").read_text()
    twin = _resolved(make_parser(), CONFIGS[0].parent / f"{baseline}.yaml")
    original = _resolved(make_parser(), CONFIGS[0].parent / f"{mhc}.yaml")
    assert original["enable_mhc_connections"] and not twin["enable_mhc_connections"]
    different = {key for key in original if original[key] != twin[key]}
    assert different == {
        "enable_mhc_connections",
        "save",
        "load",
        "tensorboard_dir",
        *also_different,
    }
    assert all(baseline in twin[key] for key in ("save", "load", "tensorboard_dir"))
    for key in also_different:
        assert twin[key] is None, key  # the flag's default


def test_a_file_overrides_its_bases_key_by_key(parser, tmp_path):
    _write(
        tmp_path,
        "model: {num_layers: 4, hidden_size: 64}\nmhc: {enable_mhc_connections: true}\n"
        "logging: {log_interval: 5}\n",
        "shared/root.yaml",
    )
    _write(
        tmp_path,
        "base: root.yaml\nmodel: {hidden_size: 128}\nmhc: {mhc_recompute_layer_num: 2}\n",
        "shared/middle.yaml",
    )
    path = _write(
        tmp_path,
        "base: shared/middle.yaml\n"
        "train: {num_layers: 6}\n"  # another section than the base's: still the same flag
        "mhc: {mhc_recompute_layer_num: null}\n"
        "logging: {log-interval: 7}\n",
    )
    values = load_yaml_config(path, parser)
    assert values == {
        "num_layers": 6,
        "hidden_size": 128,
        "enable_mhc_connections": True,
        "log_interval": 7,
    }
    args = _resolved(parser, path)
    assert args["mhc_recompute_layer_num"] is None  # null: the flag's own default


def test_null_leaves_the_flag_at_its_default(parser, tmp_path):
    path = _write(
        tmp_path, "model: {hidden_dropout: null, num_layers: 2}\nparallel: {bf16: null}\n"
    )
    assert load_yaml_config(path, parser) == {"num_layers": 2}
    args = _resolved(parser, path)
    assert args["hidden_dropout"] == parser.get_default("hidden_dropout") == 0.1
    assert args["bf16"] is False


def test_mistakes_in_base_are_errors_naming_the_file(parser, tmp_path):
    missing = _write(tmp_path, "base: nope.yaml\n", "missing.yaml")
    with pytest.raises(ConfigError, match=r"missing\.yaml: base 'nope\.yaml' does not exist"):
        load_yaml_config(missing, parser)
    for value in ("[a.yaml]", "''", "3"):
        path = _write(tmp_path, f"base: {value}\n", "bad.yaml")
        with pytest.raises(ConfigError, match=r"bad\.yaml: base=.* must be the path of a YAML"):
            load_yaml_config(path, parser)
    _write(tmp_path, "base: b.yaml\nmodel: {num_layers: 2}\n", "a.yaml")
    _write(tmp_path, "base: c.yaml\n", "b.yaml")
    _write(tmp_path, "base: a.yaml\n", "c.yaml")
    with pytest.raises(ConfigError, match=r"base 'a\.yaml' makes a cycle: a\.yaml -> b\.yaml -> "):
        load_yaml_config(str(tmp_path / "a.yaml"), parser)
    itself = _write(tmp_path, "base: itself.yaml\n", "itself.yaml")
    with pytest.raises(ConfigError, match=r"makes a cycle: itself\.yaml -> itself\.yaml"):
        load_yaml_config(itself, parser)
    # A mistake inside the base names the base file.
    _write(tmp_path, "model: {num_layer: 4}\n", "typo.yaml")
    on_typo = _write(tmp_path, "base: typo.yaml\n", "on_typo.yaml")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key model\.num_layer"):
        load_yaml_config(on_typo, parser)


def test_command_line_overrides_the_file(parser, tmp_path):
    path = _write(
        tmp_path,
        "model: {num_layers: 6, hidden_size: 64}\n"
        "mhc: {enable_mhc_connections: true, mhc_recompute_layer_num: auto}\n",
    )
    parser.set_defaults(**load_yaml_config(path, parser))
    args = parser.parse_args(["--num-layers", "8", "--num-attention-heads", "4"])
    assert (args.num_layers, args.hidden_size) == (8, 64)
    assert args.enable_mhc_connections is True
    assert args.mhc_recompute_layer_num == "auto"


def test_switches_take_booleans_in_either_direction(parser, tmp_path):
    path = _write(tmp_path, "model: {bias_gelu_fusion: false, add_bias_linear: false}\n")
    parser.set_defaults(**load_yaml_config(path, parser))
    args = parser.parse_args([])
    assert args.bias_gelu_fusion is False and args.add_bias_linear is False


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: {num_layer: 4}\n", r"unknown key model\.num_layer; did you mean 'num_layers'\?"),
        ("modle: {num_layers: 4}\n", r"unknown section 'modle'; did you mean 'model'\?"),
        ("bases: gpt_tiny_mhc.yaml\n", r"unknown section 'bases'; did you mean 'base'\?"),
        ("model: {hidden_size: wide}\n", r"model\.hidden_size='wide' is invalid"),
        ("mhc: {enable_mhc_connections: 'yes'}\n", r"mhc\.enable_mhc_connections=.* true or false"),
        ("mhc: {mhc_type: mHC}\n", r"mhc\.mhc_type='mHC' is invalid: allowed values"),
        (
            "mhc: {mhc_recompute_layer_num: sqrt}\n",
            r"mhc\.mhc_recompute_layer_num='sqrt' is invalid",
        ),
        ("model: {num_layers: 4}\ntrain: {num_layers: 6}\n", r"'num_layers' is set twice"),
        ("- model\n", r"top level must be a mapping"),
        ("model: [num_layers]\n", r"section 'model' must be a mapping"),
    ],
)
def test_mistakes_are_errors_naming_the_key(parser, tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_yaml_config(_write(tmp_path, text), parser)


def test_missing_file_is_an_error(parser, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_config(str(tmp_path / "nope.yaml"), parser)
