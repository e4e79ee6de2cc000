"""Every config file parses and validates, for every preset; overrides are typed and checked."""

from pathlib import Path

import pytest

from clara_jax.model.field_checks import SettingsError
from clara_jax.model.lora import LoRAConfig
from clara_jax.model.presets import PRESETS
from clara_jax.model.stage_registry import STAGE_LIST
from clara_jax.training.config import ConfigError, load_config, stage_config_spec, validate
from clara_jax.training.run_spec import layout_config, optimizer_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("stage*.py"))


def test_there_is_a_config_per_stage():
    assert [p.stem for p in CONFIGS] == [s.config_module for s in STAGE_LIST]
    for path, stage in zip(CONFIGS, STAGE_LIST):
        assert load_config(f"{path}:tiny").stage == stage.name


def test_a_config_loads_by_module_name_from_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ directory here: only the installed package can answer
    by_name = load_config("stage3_e2e:tiny,runlocal", ["--config.optim.lr=3e-4"])
    by_file = load_config(f"{CONFIGS[2]}:tiny,runlocal", ["--config.optim.lr=3e-4"])
    assert by_name.to_dict() == by_file.to_dict()
    with pytest.raises(ConfigError, match="stage9_x.*installed configs.*stage1_scp"):
        load_config("stage9_x:tiny")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/stage1_scp.py:tiny")


def test_the_sibling_stage_config_keeps_the_form_and_the_arg():
    assert (
        stage_config_spec("configs/stage1_scp.py:tiny,runlocal", "stage3")
        == "configs/stage3_e2e.py:tiny,runlocal"
    )
    assert stage_config_spec("stage1_scp:mistral_7b", "stage2") == "stage2_instruct:mistral_7b"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("runlocal", [False, True])
def test_every_config_and_preset_validates(path, preset, runlocal):
    arg = preset + (",runlocal" if runlocal else "")
    overrides = [] if preset in ("tiny", "smollm2_135m") else ["--config.model.path=/models/somewhere"]
    config = load_config(f"{path}:{arg}", overrides)
    assert config.model.preset == preset
    assert (
        config.stage
        == {"stage1_scp": "stage1", "stage2_instruct": "stage2", "stage3_e2e": "stage3"}[path.stem]
    )
    assert config.batch.global_size % config.batch.micro_size == 0


def test_paper_defaults():
    s1 = load_config(f"{CONFIGS[0]}:mistral_7b", ["--config.model.path=/m"])
    assert (s1.optim.lr, s1.optim.schedule, s1.batch.global_size, s1.clara.compression_rate) == (
        1e-4,
        "cosine",
        128,
        32,
    )
    assert (s1.clara.doc_max_length, s1.clara.mse_weight, s1.optim.b2, s1.optim.clip_norm) == (
        256,
        0.1,
        0.95,
        1.0,
    )
    s3 = load_config(f"{CONFIGS[2]}:mistral_7b", ["--config.model.path=/m"])
    assert (s3.optim.lr, s3.optim.schedule, s3.batch.global_size, s3.clara.top_k, s3.clara.temperature) == (
        5e-6,
        "constant",
        32,
        5,
        0.02,
    )
    s2 = load_config(f"{CONFIGS[1]}:tiny")
    assert s2.clara.docs_per_example == 5


def test_smollm2_preset_loads_from_the_pypi_package():
    config = load_config(f"{CONFIGS[0]}:smollm2_135m")
    assert config.model.path == "smollm2"  # resolved by clara_jax.interop.gguf.resolve_model_path


def test_overrides_are_typed_and_checked():
    config = load_config(
        f"{CONFIGS[0]}:tiny",
        ["--config.optim.lr=3e-4", "--config.plot=false", "--config.batch.global_size=16"],
    )
    assert config.optim.lr == 3e-4 and config.plot is False and config.batch.global_size == 16
    with pytest.raises(ConfigError, match="expected float"):
        load_config(f"{CONFIGS[0]}:tiny", ["--config.optim.lr=fast"])
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        load_config(f"{CONFIGS[0]}:tiny", ["--config.optim.lrr=1"])


def test_validation_reports_every_problem_with_field_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(
            f"{CONFIGS[2]}:tiny",
            [
                "--config.batch.global_size=10",
                "--config.batch.micro_size=4",
                "--config.clara.top_k=30",
                "--config.lora.dropout=1.5",
                "--config.mesh=data=3,fsdp=-1,tensor=-1",
            ],
        )
    text = str(err.value)
    for fragment in (
        "batch.global_size = 10: expected a multiple of batch.micro_size = 4",
        "data.candidates = 20: expected >= clara.top_k = 30",
        "lora.dropout = 1.5: expected in [0, 1)",
        "mesh = 'data=3,fsdp=-1,tensor=-1'",
    ):
        assert fragment in text
    with pytest.raises(ConfigError, match="model.path"):
        load_config(f"{CONFIGS[0]}:mistral_7b")
    with pytest.raises(ConfigError, match="unknown config argument"):
        load_config(f"{CONFIGS[0]}:tiny,fast")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py:tiny")


def test_validation_returns_the_typed_settings_the_run_builds():
    config = load_config(f"{CONFIGS[2]}:tiny,runlocal")
    spec = validate(config)
    assert spec.stage.retrieval and str(spec.model.dtype.compute) == "float32"
    assert spec.lora == LoRAConfig(rank=8, alpha=16.0, dropout=0.1)
    assert spec.layout == layout_config(config) and spec.batch.global_size == 8
    assert spec.clara.model_config(range(100, 108)).mem_token_ids == tuple(range(100, 108))
    # the optimizer of a saved config (a stage resuming its predecessor), over the run's length
    assert optimizer_config(config.to_dict(), 50) == optimizer_config(config, 50)
    assert optimizer_config(config, 50).schedule == spec.optim.schedule == "constant"


def test_a_settings_dataclass_reports_all_its_problems_at_once():
    with pytest.raises(SettingsError) as err:
        LoRAConfig(rank=0, alpha=8, dropout=1.5)
    assert err.value.problems == ("lora.rank = 0: expected > 0", "lora.dropout = 1.5: expected in [0, 1)")


def test_stage_chain_accepts_one_base_named_two_ways(tmp_path, monkeypatch):
    from clara_jax.training.build import check_chain

    base = tmp_path / "runs" / "base"
    base.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    stage1 = load_config(f"{CONFIGS[0]}:tiny", [f"--config.model.path={base}"]).to_dict()
    stage2 = load_config(f"{CONFIGS[1]}:tiny", ["--config.model.path=runs/base"])
    check_chain(stage2, stage1, "stage1 run")  # relative here, absolute when stage 1 saved it

    other = tmp_path / "runs" / "other"
    other.mkdir()
    moved = load_config(f"{CONFIGS[1]}:tiny", [f"--config.model.path={other}"])
    with pytest.raises(ValueError, match=r"model\.path: this run has .*other"):
        check_chain(moved, stage1, "stage1 run")


def test_candidate_dropout_rules_out_the_candidate_cache():
    """The official switch compresses candidates with dropout: nothing stays the same to cache."""
    with pytest.raises(
        ConfigError, match="data.cache_candidates = True: expected false with clara.candidate_dropout"
    ):
        load_config(f"{CONFIGS[2]}:tiny", ["--config.clara.candidate_dropout=true"])
    config = load_config(
        f"{CONFIGS[2]}:tiny",
        ["--config.clara.candidate_dropout=true", "--config.data.cache_candidates=false"],
    )
    assert config.clara.candidate_dropout and not config.data.cache_candidates
