from pathlib import Path

import pytest

from minigpt_cli.config import Config, preset_names
from minigpt_cli.errors import ConfigError


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = Config.from_preset(name)
    assert cfg.preset == name
    assert cfg.description
    cfg.validate()


def test_required_presets_exist():
    assert {"tiny", "small", "gpt2"} <= set(preset_names())


def test_small_preset_is_the_original_design():
    m = Config.from_preset("small").model
    assert (m.vocab_size, m.max_seq_length, m.embed_dim, m.num_heads, m.num_layers,
            m.ff_dim, m.dropout) == (50257, 128, 256, 8, 4, 1024, 0.1)
    t = Config.from_preset("small").train
    assert (t.batch_size, t.epochs) == (16, 3)


def test_overrides_are_typed():
    cfg = Config.from_sources("tiny", overrides=["train.batch_size=8", "model.dropout=0.2",
                                                 "train.learning_rate=3e-4",
                                                 "tokenizer.spec=tiktoken:gpt2",
                                                 "train.max_steps=null"])
    assert cfg.train.batch_size == 8
    assert cfg.model.dropout == 0.2
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.tokenizer.spec == "tiktoken:gpt2"
    assert cfg.train.max_steps is None


def test_float_key_accepts_int():
    assert Config.from_sources("tiny", overrides=["train.epochs=2"]).train.epochs == 2.0


@pytest.mark.parametrize("override, fragment", [
    ("model.foo=1", "model.foo"),
    ("nosuch.key=1", "nosuch.key"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("model.embed_dim=130", "model.embed_dim"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("model.num_layers=0", "model.num_layers"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.device=tpu", "train.device"),
    ("model.bias=yes please", "model.bias"),
    ("novalue", "override"),
])
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        Config.from_sources("tiny", overrides=[override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        Config.from_sources("nope")


def test_config_file_round_trip(tmp_path: Path):
    cfg = Config.from_sources("small", overrides=["model.num_layers=2"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = Config.from_sources(config_file=path)
    assert again.to_dict() == cfg.to_dict()


def test_a_config_file_naming_a_preset_starts_from_it(tmp_path: Path):
    from minigpt_cli.config import source_keys

    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  max_steps: 5\n")
    cfg = Config.from_sources(config_file=path)
    tiny = Config.from_preset("tiny")
    tiny.train.max_steps = 5
    assert cfg.to_dict() == tiny.to_dict()
    assert Config.from_sources(config_file=path).model.embed_dim != Config().model.embed_dim
    # --resume --config compares what the file sets, the preset's keys included
    assert source_keys(config_file=path) == source_keys("tiny") | {"train.max_steps"}
    for bad in ("nope", "5"):
        path.write_text(f"preset: {bad}\n")
        with pytest.raises(ConfigError, match="names no preset") as e:
            Config.from_sources(config_file=path)
        assert "tiny" in e.value.hint


def test_config_file_yaml_error_has_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embed_dim: 64\n  num_heads: [4\n")
    with pytest.raises(ConfigError, match="line"):
        Config.from_sources(config_file=path)


@pytest.mark.parametrize("text, key", [
    ("train:\n  max_steps: 5\n  max_steps: 7\n", "max_steps"),
    ("model:\n  embed_dim: 64\nmodel:\n  num_layers: 2\n", "model"),
])
def test_a_key_given_twice_is_refused(tmp_path: Path, text, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"the key '{key}' is given twice"):
        Config.from_sources(config_file=path)


def test_config_file_unknown_section(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  embed_dim: 64\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        Config.from_sources(config_file=path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_sources(config_file=tmp_path / "nope.yaml")


def test_preset_and_config_together(tmp_path: Path):
    with pytest.raises(ConfigError, match="either"):
        Config.from_sources("tiny", config_file=tmp_path / "x.yaml")


def _float_keys() -> list[str]:
    """Every float setting of every section, found from the dataclasses themselves."""
    import typing

    from minigpt_cli.config import SECTIONS

    keys = []
    for section, cls in SECTIONS.items():
        for key, hint in typing.get_type_hints(cls).items():
            if float in (typing.get_args(hint) or (hint,)):
                keys.append(f"{section}.{key}")
    return keys


def test_every_float_setting_is_found():
    assert {"model.dropout", "model.norm_eps", "model.rope_theta", "data.val_fraction",
            "train.epochs", "train.learning_rate", "train.weight_decay", "train.grad_clip",
            "train.min_lr_ratio", "train.beta1", "train.beta2", "lora.alpha",
            "lora.dropout"} <= set(_float_keys())


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("key", _float_keys())
def test_a_float_setting_must_be_finite(key, value):
    with pytest.raises(ConfigError) as e:
        Config.from_sources("tiny", overrides=[f"{key}={value}"])
    assert str(e.value).startswith(f"{key} must be a finite number"), str(e.value)


@pytest.mark.parametrize("seed", [-1, -5, 2**64, 10**20])
def test_a_seed_outside_what_the_generators_take_is_refused(seed):
    with pytest.raises(ConfigError, match=r"train.seed must be between 0 and 2\*\*64 - 1"):
        Config.from_sources("tiny", overrides=[f"train.seed={seed}"])


@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_the_seeds_at_the_ends_of_the_range_are_accepted(seed):
    assert Config.from_sources("tiny", overrides=[f"train.seed={seed}"]).train.seed == seed


def test_epochs_given_as_an_override_replace_the_presets_max_steps():
    from minigpt_cli.config import override_keys

    assert Config.from_preset("tiny").train.max_steps == 1500
    cfg = Config.from_sources("tiny", overrides=["train.epochs=0.5"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (0.5, None)
    assert override_keys(["train.epochs=0.5"]) == {"train.epochs", "train.max_steps"}
    cfg = Config.from_sources("tiny", overrides=["train.epochs=2", "train.max_steps=null"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (2, None)
    # a step count alone keeps the preset's (unused) epochs; both is ambiguous
    assert Config.from_sources("small", overrides=["train.max_steps=7"]).train.max_steps == 7
    with pytest.raises(ConfigError, match="train.epochs and train.max_steps both"):
        Config.from_sources("tiny", overrides=["train.max_steps=7", "train.epochs=2"])


def test_epochs_in_a_config_file_leave_its_max_steps_in_charge(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  max_steps: 20\n")
    assert Config.from_sources(config_file=path).train.max_steps == 20


def test_source_keys_are_the_keys_a_preset_or_file_sets(tmp_path: Path):
    from minigpt_cli.config import source_keys

    keys = source_keys("tiny")
    assert {"data.dataset", "train.batch_size", "train.max_steps", "model.embed_dim"} <= keys
    assert "lora.alpha" not in keys and "description" not in keys
    path = tmp_path / "c.yaml"
    path.write_text("description: mine\ntrain:\n  batch_size: 8\ndata:\n")
    assert source_keys(config_file=path) == {"train.batch_size"}
