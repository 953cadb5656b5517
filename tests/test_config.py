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


def test_config_file_yaml_error_has_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embed_dim: 64\n  num_heads: [4\n")
    with pytest.raises(ConfigError, match="line"):
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
