"""Configuration: dataclasses, presets, YAML files and ``--set section.key=value`` overrides.

Everything stored here is plain YAML-serialisable data. ``Config.from_sources`` builds a
config from a preset or a file, applies overrides and validates; a bad key or value is a
``ConfigError`` that names the key. Every float setting must be a finite number (NaN and
infinity pass comparisons such as ``value > 0``, so each section's ``validate`` rejects them
first); ranges are checked after that.

How long to train: ``train.max_steps`` wins over ``train.epochs`` within a preset or file.
An override of ``train.epochs`` (``--epochs``) clears the preset's ``train.max_steps``, since
that is what it asks for; overriding both with a step count is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from minigpt_cli.errors import ConfigError

PRESETS_PACKAGE = "minigpt_presets"


POSITIONS = ("learned", "rope")  # the variants gpt.py maps to modules
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: take the tokenizer's vocabulary size
    max_seq_length: int = 128
    embed_dim: int = 256
    num_heads: int = 8
    num_layers: int = 4
    ff_dim: int | None = 1024  # None: 4 x embed_dim (gelu) or about 8/3 x (swiglu)
    dropout: float = 0.1
    bias: bool = True
    # The architecture: GPT-2's by default, Llama's with rope, rmsnorm, swiglu and fewer
    # kv heads.
    position: str = "learned"  # learned (an embedding per position) | rope (rotary)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    num_kv_heads: int | None = None  # None: num_heads; fewer: grouped-query attention
    tie_embeddings: bool = True  # the output head is the token embedding
    qk_norm: bool = False  # model.norm on each head's queries and keys, before rope
    norm_eps: float = 1e-5

    def validate(self) -> None:
        _finite_floats(self, "model")
        for key in ("max_seq_length", "embed_dim", "num_heads", "num_layers"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("vocab_size", "ff_dim", "num_kv_heads"):
            if getattr(self, key) is not None:
                _positive(f"model.{key}", getattr(self, key))
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for key, names in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, key) not in names:
                raise ConfigError(f"model.{key} must be {' or '.join(names)}, "
                                  f"got '{getattr(self, key)}'")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                              f"model.num_kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.position rope needs an even head dimension, got "
                              f"{self.head_dim} (model.embed_dim / model.num_heads)")
        _positive("model.rope_theta", self.rope_theta)
        _positive("model.norm_eps", self.norm_eps)
        if self.ff_dim is None:
            self.ff_dim = self.ff_width

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ff_width(self) -> int:
        """``ff_dim``, or its usual size: 4 x embed_dim for GELU; for SwiGLU 8/3 x, which
        keeps its three matrices at the parameters of GELU's two, rounded up to 64."""
        if self.ff_dim is not None:
            return self.ff_dim
        if self.mlp == "swiglu":
            return -(-8 * self.embed_dim // 3 // 64) * 64
        return 4 * self.embed_dim


@dataclass
class TokenizerConfig:
    spec: str = "byte"

    def validate(self) -> None:
        _finite_floats(self, "tokenizer")
        if not self.spec.strip():
            raise ConfigError("tokenizer.spec must not be empty")


@dataclass
class DataConfig:
    dataset: str = "stdlib-docs"
    val_fraction: float = 0.1  # for a single text file: the last part becomes validation
    format: str = "auto"  # auto (by content) | text | chat (JSONL conversations)
    template: str = "minigpt"  # the chat template conversations are rendered with

    def validate(self) -> None:
        _finite_floats(self, "data")
        if not self.dataset.strip():
            raise ConfigError("data.dataset must not be empty")
        if self.format not in ("auto", "text", "chat"):
            raise ConfigError(f"data.format must be auto, text or chat, got '{self.format}'")
        if not self.template.strip():
            raise ConfigError("data.template must not be empty")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class TrainConfig:
    batch_size: int = 16
    epochs: float = 1.0
    max_steps: int | None = None  # when set, wins over epochs (see the module docstring)
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1
    log_interval: int = 10
    eval_interval: int = 200
    eval_iters: int = 20  # validation batches per evaluation during training
    checkpoint_interval: int = 500
    keep_last: int = 0  # older checkpoints kept besides the latest and the best
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the training steps (pays on GPUs, rarely on CPUs)
    init: str | None = None  # start from these weights: a GPT-2 folder, hf:NAME or a run
    strategy: str = "ddp"  # in several processes: ddp (replicas) | fsdp (sharded, FSDP2)

    def validate(self) -> None:
        _finite_floats(self, "train")
        for key in ("batch_size", "grad_accum_steps", "log_interval", "eval_interval",
                    "eval_iters", "checkpoint_interval"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("learning_rate", "epochs"):
            _positive(f"train.{key}", getattr(self, key))
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        for key in ("warmup_steps", "weight_decay", "grad_clip", "keep_last"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.seed < 2**64:  # what numpy's and torch's generators take
            raise ConfigError(f"train.seed must be between 0 and 2**64 - 1, got {self.seed}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or mps, got '{dev}'")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"train.strategy must be ddp or fsdp, got '{self.strategy}'")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(
                f"train.precision must be auto, fp32, bf16 or fp16, got '{self.precision}'"
            )


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA) on the base model of ``train.init``, which stays frozen."""

    rank: int | None = None  # 0 or null: no adapters (full fine-tuning or training)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: str = "attn, mlp"  # module names, endings or parents (attn, mlp), comma-separated

    @property
    def enabled(self) -> bool:
        return bool(self.rank)

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> None:
        _finite_floats(self, "lora")
        if self.rank is not None and self.rank < 0:
            raise ConfigError(f"lora.rank must be positive (0 or null: off), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_list:
            raise ConfigError("lora.targets names no module",
                              "list module names such as attn, mlp, c_attn, mlp.c_fc")


SECTIONS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig,
            "train": TrainConfig, "lora": LoraConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    preset: str | None = None
    description: str = ""

    def validate(self) -> Config:
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.lora.enabled and not self.train.init:
            raise ConfigError("lora.rank needs a base model to adapt (train.init)",
                              "name a run, a GPT-2 folder or hf:NAME to start from")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Any, origin: str = "config", base: Config | None = None) -> Config:
        """The settings of ``raw`` over ``base`` (a copy; by default, the defaults)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: expected a mapping of sections at the top level")
        cfg = cls() if base is None else copy.deepcopy(base)
        for key, value in raw.items():
            if key in ("preset", "description"):
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"{origin}: '{key}' must be a string")
                setattr(cfg, key, value or ("" if key == "description" else None))
                continue
            if key not in SECTIONS:
                raise ConfigError(f"{origin}: unknown section '{key}'",
                                  f"sections are {', '.join(SECTIONS)}")
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: section '{key}' must be a mapping")
            for sub, v in value.items():
                set_key(cfg, f"{key}.{sub}", v)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> Config:
        return cls.from_dict(_read_file(Path(path)), str(path))

    @classmethod
    def from_preset(cls, name: str) -> Config:
        cfg = cls.from_dict(_read_preset(name), f"preset {name}")
        cfg.preset = name
        return cfg

    @classmethod
    def from_sources(cls, preset: str | None = None, config_file: Path | None = None,
                     overrides: typing.Sequence[str] = ()) -> Config:
        """A preset or a file (a file may name a preset to start from), then overrides."""
        if preset and config_file:
            raise ConfigError("give either a preset or a config file, not both")
        if config_file:
            raw = _read_file(Path(config_file))
            base = _base_preset(raw, str(config_file))
            cfg = cls.from_dict(raw, str(config_file),
                                None if base is None else cls.from_preset(base))
        else:
            cfg = cls.from_preset(preset or "tiny")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"bad override '{item}'", "write section.key=value")
            set_key(cfg, key.strip(), _safe_yaml(value, f"override {key}") if value else "")
        keys = {item.partition("=")[0].strip() for item in overrides}
        if "train.epochs" in keys:  # a length asked for here replaces the preset's
            if "train.max_steps" not in keys:
                cfg.train.max_steps = None
            elif cfg.train.max_steps is not None:
                raise ConfigError("train.epochs and train.max_steps both set how long to "
                                  "train", "give one of them: a number of passes over the "
                                  "data, or of steps")
        return cfg.validate()


def override_keys(overrides: typing.Sequence[str]) -> set[str]:
    """The ``section.key`` settings that ``overrides`` change, ``train.max_steps`` included
    when an override of ``train.epochs`` clears it (see ``Config.from_sources``)."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    return (keys | {"train.max_steps"}) if "train.epochs" in keys else keys


def source_keys(preset: str | None = None, config_file: Path | None = None) -> set[str]:
    """The ``section.key`` settings that a preset or config file sets itself (the keys it
    leaves out keep their defaults)."""
    raw = _read_file(Path(config_file)) if config_file else _read_preset(preset or "tiny")
    if not isinstance(raw, dict):
        return set()
    base = _base_preset(raw, str(config_file)) if config_file else None
    keys = source_keys(base) if base is not None else set()
    return keys | {f"{section}.{key}" for section, values in raw.items()
                   if section in SECTIONS and isinstance(values, dict) for key in values}


def _base_preset(raw: Any, origin: str) -> str | None:
    """The preset a config file starts from (its ``preset`` key), checked; None if none."""
    name = raw.get("preset") if isinstance(raw, dict) else None
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name not in preset_names():
        raise ConfigError(f"{origin}: 'preset' names no preset: {name!r}",
                          f"available presets: {', '.join(preset_names())}, or leave it out "
                          "to start from the defaults")
    return name


def preset_names() -> list[str]:
    root = resources.files(PRESETS_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_summaries() -> list[tuple[str, str]]:
    return [(name, Config.from_preset(name).description) for name in preset_names()]


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` to ``value``, checking that the key exists and the type fits."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise ConfigError(f"unknown config key '{dotted}'",
                          f"keys look like section.key with section one of {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        known = ", ".join(f.name for f in fields(obj))
        raise ConfigError(f"unknown config key '{dotted}'", f"{section} keys: {known}")
    setattr(obj, key, _coerce(dotted, value, hints[key]))


def _coerce(dotted: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{dotted} must not be empty")
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{dotted} must be {names}, got {value!r}")


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    return _safe_yaml(text, str(path))


def _read_preset(name: str) -> Any:
    path = resources.files(PRESETS_PACKAGE) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'",
                          f"available presets: {', '.join(preset_names())}")
    return _safe_yaml(path.read_text(encoding="utf-8"), f"preset {name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says keys are
    unique; PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _safe_yaml(text: str, origin: str) -> Any:
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader: plain data, no Python objects
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{origin}: YAML syntax error{where}: {problem}") from e


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _finite_floats(section: Any, name: str) -> None:
    """Every float setting of ``section`` must be a finite number: NaN passes every range
    check written as a comparison, and infinity breaks what is computed from it."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}.{f.name} must be a finite number, got {value}")
