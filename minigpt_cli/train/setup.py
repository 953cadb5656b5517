"""Everything ``minigpt train`` does before the loop starts: config, tokenizer, data,
run directory, model and trainer, for a new run or one being resumed. No printing: progress
is reported through the ``progress`` callback as ``(stage, done, total)``.

In several processes rank 0 does the work that writes (tokenizer, token cache, run
directory) while the others wait; then every rank builds the same model and its trainer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import minigpt_tokenizers
from minigpt_cli import paths
from minigpt_cli.chat.template import get_template, save_run_template
from minigpt_cli.config import Config
from minigpt_cli.data import chat
from minigpt_cli.data.resolve import resolve_source
from minigpt_cli.data.token_cache import check_length, token_cache
from minigpt_cli.device import configure_backends, is_out_of_memory, select_device, select_precision
from minigpt_cli.errors import CheckpointError, ConfigError, DataError, MiniGPTError
from minigpt_cli.fileio import atomic_write_text
from minigpt_cli.model import flops, lora
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import checkpoint as ckpt
from minigpt_cli.run import layout
from minigpt_cli.run.history import MetricsLog
from minigpt_cli.run.load import base_record, base_weights, load_config, load_tokenizer
from minigpt_cli.train import distributed
from minigpt_cli.train.events import Callback, MetricsWriter
from minigpt_cli.train.trainer import Trainer

Progress = Callable[[str, int, int], None]

# Settings a resumed run may change; anything else would not continue the same run.
RESUMABLE_CHANGES = {"max_steps", "epochs", "log_interval", "eval_interval", "eval_iters",
                     "checkpoint_interval", "keep_last", "device", "precision", "strategy"}


@dataclass
class PreparedRun:
    config: Config
    run_dir: Path
    trainer: Trainer
    tokenizer: minigpt_tokenizers.Tokenizer
    device: torch.device
    resumed_from: Path | None
    notes: list[str]  # things the user should know, e.g. a damaged checkpoint was skipped
    # conversations: the start of the first training row as (text, trained) runs
    chat_example: list[tuple[str, bool]] | None = None
    made_dir: bool = False  # a new run whose folder setup made (it was not there, empty)

    def discarded_on_failure(self) -> contextlib.AbstractContextManager[None]:
        """Around training: a new run that fails before its first checkpoint is taken back
        (``layout.discard_new_run_dir``), so that the same command can run again."""
        return discarded_on_failure(self.run_dir, self.resumed_from is None, self.made_dir)


@contextlib.contextmanager
def held_while_set_up(run_dir: Path | None) -> Iterator[None]:
    """A run to resume is held from the start (``layout.hold_run_dir``: one training per
    run at a time, and nothing said of a run that another process trains); if setting it
    up fails, it is let go. Training lets go of it when it ends."""
    if run_dir is None:
        yield
        return
    layout.hold_run_dir(run_dir)
    try:
        yield
    except BaseException:
        layout.release_run_dir(run_dir)
        raise


@contextlib.contextmanager
def discarded_on_failure(run_dir: Path, new: bool, made: bool) -> Iterator[None]:
    """If the block fails, a ``new`` run without a checkpoint leaves nothing behind in
    ``run_dir`` (``made``: setup made the folder). Rank 0 alone writes, and takes back."""
    try:
        yield
    except BaseException:
        if new and distributed.is_main():
            layout.discard_new_run_dir(run_dir, made)
        layout.release_run_dir(run_dir)
        raise


def default_run_dir(config: Config, root: Path = paths.RUNS_DIR) -> Path:
    stem = config.preset or "run"
    base = root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def absolutize_dataset(config: Config) -> None:
    """Store a local dataset path absolutely so the run works from any directory."""
    path = Path(config.data.dataset).expanduser()
    if path.exists():
        config.data.dataset = str(path.resolve())


def resume_config(run_dir: Path, requested: Config, changed: set[str]) -> Config:
    """The run's own config with the allowed changes from ``requested`` applied."""
    if not layout.is_run_dir(run_dir):
        if (run_dir / layout.CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} has no checkpoint to resume from",
                                  f"it stopped before its first one: remove {run_dir} and "
                                  "train again")
        raise CheckpointError(f"nothing to resume in {run_dir}",
                              "train a new run there instead")
    saved = load_config(run_dir)
    merged = copy.deepcopy(saved)
    for dotted in sorted(changed):
        section, _, key = dotted.partition(".")
        new = getattr(getattr(requested, section), key)
        old = getattr(getattr(saved, section), key)
        if dotted == "data.dataset" and Path(new).expanduser().exists():
            new = str(Path(new).expanduser().resolve())
        if new == old or (dotted == "model.vocab_size" and new is None):
            continue
        if section != "train" or key not in RESUMABLE_CHANGES:
            raise ConfigError(f"cannot resume with {dotted}={new!r}: the run was trained with "
                              f"{old!r}", "start a new run in another run directory instead")
        setattr(merged.train, key, new)
    return merged.validate()


def init_source(config: Config, changed: set[str]):
    """The model ``train.init`` names, with ``config`` made to fit it: the model's shape and
    tokenizer come from the source. Besides, ``model.dropout`` may be set, and
    ``model.max_seq_length`` lowered (the position embedding is cropped)."""
    from minigpt_cli.convert.importing import resolve

    start = resolve(config.train.init)
    free = {"model.dropout", "model.max_seq_length"}
    fixed = sorted(k for k in changed if (k.startswith("model.") and k not in free)
                   or k == "tokenizer.spec")
    if fixed:
        raise ConfigError(f"{fixed[0]} comes from {start.name} when training from it "
                          "(train.init)", "leave it out: only model.dropout, a shorter "
                          "model.max_seq_length and the train and data settings can change")
    context = start.model.max_seq_length
    if "model.max_seq_length" in changed:
        if config.model.max_seq_length > context:
            raise ConfigError(f"model.max_seq_length {config.model.max_seq_length} is longer "
                              f"than {start.name}'s context ({context})",
                              f"use at most {context}")
        context = config.model.max_seq_length
        wpe = start.state_dict.get("transformer.wpe.weight")
        if wpe is not None:  # learned positions; rotary ones need no cropping
            start.state_dict["transformer.wpe.weight"] = wpe[:context].clone()
    dropout = config.model.dropout if "model.dropout" in changed else start.model.dropout
    start.model = dataclasses.replace(start.model, dropout=dropout, max_seq_length=context)
    config.model = start.model
    config.tokenizer.spec = start.tokenizer.spec
    config.validate()
    return start


def grow_vocab(start, vocab_size: int) -> None:
    """Make room for new tokens (a chat template's) in a model to fine-tune: new rows of
    the embedding (tied with the output head) start at the mean of the existing ones."""
    lora.grow_vocab_rows(start.state_dict, vocab_size)
    start.model = dataclasses.replace(start.model, vocab_size=vocab_size)


def prepare(config: Config, out: Path | None, resume: bool = False,
            changed: set[str] = frozenset(), callbacks: list[Callback] = (),
            progress: Progress | None = None) -> PreparedRun:
    """Set up a run. With ``resume``, ``out`` is an existing run and ``changed`` the keys the
    user set on the command line; the run's saved config is used otherwise.

    Launched by torchrun, this joins the process group first; ``callbacks`` and
    ``progress`` then only matter on rank 0, the one that reports."""
    device = select_device(config.train.device)
    if config.lora.enabled and config.train.strategy == "fsdp" and distributed.launched():
        raise ConfigError("lora.rank: LoRA runs train in one process or with "
                          "train.strategy=ddp, not fsdp", "use train.strategy=ddp")
    dist, device = distributed.init(device)
    if not resume:  # a setting the device cannot honour fails before the run directory exists
        select_precision(config.train.precision, device)
    made = out is None or not out.exists()  # a new run: whether setup makes its folder
    held = out if resume else None
    if not dist.enabled:
        with held_while_set_up(held):
            prepared = _prepare_data(config, out, resume, changed, progress)
        with discarded_on_failure(prepared[1], not resume, made):
            run = _build(*prepared, resume, device, callbacks)
        run.made_dir = made
        return run
    if dist.is_main:
        try:
            with held_while_set_up(held):
                prepared = _prepare_data(config, out, resume, changed, progress)
        except BaseException:
            # the others leave; rank 0 says why. They may be gone already (Ctrl-C reaches
            # every rank): what rank 0 met is the news, not that.
            with contextlib.suppress(MiniGPTError):
                distributed.share_from_main(None)
            raise
        with discarded_on_failure(prepared[1], not resume, made):
            distributed.share_from_main((prepared[0].to_dict(), prepared[1], prepared[4]))
            with distributed.setting_up():
                run = _build(*prepared, resume, device, callbacks)
        run.made_dir = made
        return run
    shared = distributed.share_from_main()
    if shared is None:
        raise distributed.RankFailed(f"rank {dist.rank}: rank 0 failed to set up the run")
    raw, run_dir, resumed_from = shared
    config = Config.from_dict(raw).validate()  # rank 0's, with the changes of a resume
    tokenizer = load_tokenizer(run_dir)
    source = _source(config)
    splits = load_splits(config, source, tokenizer)
    with distributed.setting_up():
        return _build(config, run_dir, tokenizer, splits, resumed_from, [], None, resume,
                      device, [])


@dataclass
class Split:
    """What the trainer reads of a split: token ids, and for conversations which are
    targets (``mask``) and how the conversations were packed."""

    tokens: object
    mask: object = None
    packed: chat.Packed | None = None


def _source(config: Config):
    source = resolve_source(config.data.dataset, config.data.val_fraction, config.data.format)
    if isinstance(source, chat.ChatSource):
        source.template = get_template(config.data.template, "data.template")
    return source


def load_splits(config: Config, source, tokenizer, progress: Progress | None = None
                ) -> dict[str, Split]:
    """The train and val splits, from the token cache; conversations packed into rows."""
    report = progress or (lambda stage, done, total: None)
    splits = {}
    for split in ("train", "val"):
        def on_progress(done: int, total: int, split: str = split) -> None:
            report(f"tokenizing {split}", done, total)
        if isinstance(source, chat.ChatSource):
            cached = chat.chat_token_cache(source, split, tokenizer, source.template,
                                           progress=on_progress)
            packed = chat.pack(cached, config.model.max_seq_length, tokenizer.eot_id)
            if not packed.trained_tokens:
                raise DataError(f"the {split} split of {source.name} has no assistant tokens "
                                "to learn from")
            splits[split] = Split(packed.tokens, packed.mask, packed)
        else:
            arr = token_cache(source, split, tokenizer, progress=on_progress)
            check_length(arr, config.model.max_seq_length, split)
            splits[split] = Split(arr.tokens)
    return splits


def _prepare_data(config: Config, out: Path | None, resume: bool, changed: set[str],
                  progress: Progress | None):
    """Config, tokenizer, token caches and run directory: everything that writes."""
    report = progress or (lambda stage, done, total: None)
    resumed_from, notes = None, []
    if resume:
        if out is None:
            raise ConfigError("resuming needs the run directory to continue")
        config = resume_config(out, config, changed)
        resumed_from, notes = ckpt.resume_checkpoint(out)
    else:
        config.validate()  # every setting checked before anything is written
        absolutize_dataset(config)
        out = out or default_run_dir(config)
        layout.check_new_run_dir(out)  # before any work: an existing run is never overwritten
    start = None  # the model to start from (train.init), for a new run
    if config.train.init and not resume:
        report(f"loading {config.train.init}", 0, 0)
        start = init_source(config, changed)
    elif resume and config.lora.enabled:  # the frozen base, as it was
        report(f"loading the base model {config.train.init}", 0, 0)
        start = resumed_base(out, resumed_from, config)
    if config.lora.enabled:
        lora.check_targets(config.model, config.lora)  # before anything is written
    source = _source(config)
    template = source.template if isinstance(source, chat.ChatSource) else None
    if resume:
        tokenizer = load_tokenizer(out)
    elif start is not None:
        tokenizer = start.tokenizer
    else:
        report(f"preparing tokenizer {config.tokenizer.spec}", 0, 0)
        tokenizer = minigpt_tokenizers.create(config.tokenizer.spec,
                                              lambda: source.iter_text("train"))
    if template is not None and not resume:
        tokenizer.add_special_tokens(template.special_tokens)
        if start is not None and tokenizer.vocab_size > config.model.vocab_size:
            if config.lora.enabled:  # the base as it is, before its new rows
                start.base = {"sha256": lora.fingerprint(start.state_dict),
                              "vocab_size": config.model.vocab_size}
            grow_vocab(start, tokenizer.vocab_size)
            config.model = start.model
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size})",
                          "remove model.vocab_size or raise it")

    splits = load_splits(config, source, tokenizer, report)
    check_job_batch(config, splits["train"], distributed.info().world_size)

    if resume:
        run_dir = out
    else:
        made = not out.exists()
        run_dir = layout.create_run_dir(out)
        with discarded_on_failure(run_dir, True, made):
            layout.hold_run_dir(run_dir)
            layout.write_run_files(run_dir, config, tokenizer)
            if template is not None:
                save_run_template(run_dir, template)
    return config, run_dir, tokenizer, splits, resumed_from, notes, start


def check_job_batch(config: Config, train: Split, world_size: int) -> None:
    """In several processes, a step of the job must fit in the training data."""
    if world_size == 1:
        return
    per_step = config.train.batch_size * config.train.grad_accum_steps * world_size
    windows = (len(train.tokens) - 1) // config.model.max_seq_length
    if per_step > windows:
        raise ConfigError(f"train.batch_size x train.grad_accum_steps x {world_size} "
                          f"processes is {per_step} windows a step, more than the "
                          f"{windows} of the training data",
                          "lower train.batch_size or use fewer processes")


def resumed_base(run_dir: Path, checkpoint: Path, config: Config):
    """The base model a LoRA run resumes on, checked against the one it was trained on."""
    from minigpt_cli.convert.importing import Source

    base = base_record(checkpoint, ckpt.read_state(checkpoint))
    weights = base_weights(run_dir, base, config.model)
    return Source(base.get("source", base["path"]), config.model, weights, None,
                  Path(base["path"]),
                  {k: base[k] for k in ("sha256", "vocab_size") if k in base})


def _build(config: Config, run_dir: Path, tokenizer, splits, resumed_from: Path | None,
           notes: list[str], start, resume: bool, device: torch.device,
           callbacks: list[Callback]) -> PreparedRun:
    """The model and its trainer, restored from ``resumed_from``; on every rank."""
    dist = distributed.info()
    precision = select_precision(config.train.precision, device)
    configure_backends(device)
    torch.manual_seed(config.train.seed)

    try:
        model = (GPT(config.model) if start is None else start.build(config.model)).to(device)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"the model does not fit in the memory of {device}",
                          "make it smaller: model.embed_dim, model.num_layers, model.ff_dim "
                          "or model.vocab_size") from e
    base = None
    if config.lora.enabled:  # the base frozen, adapters on its projections
        lora.inject(model, config.lora)
        if start is not None:
            base = {"source": config.train.init, "path": str(start.path),
                    **(start.base or {"sha256": lora.fingerprint(start.state_dict)})}
        if base is not None and "vocab_size" in base:  # the template's new tokens learn too
            lora.train_added_rows(model, base["vocab_size"])
    if dist.enabled:
        distributed.broadcast_module(model)  # rank 0's weights (train.init) everywhere
        torch.manual_seed((config.train.seed + dist.rank) % 2**64)  # each rank its own dropout
    metrics = MetricsLog(run_dir)
    fpt = flops.flops_per_token(model)
    peak = flops.peak_flops(device, precision) if dist.is_main else None
    reporters = [MetricsWriter(metrics), *callbacks] if dist.is_main else []
    trainer = Trainer(model, config.train, splits["train"].tokens, splits["val"].tokens,
                      config.model.max_seq_length, device, precision, run_dir, reporters,
                      fpt, peak, splits["train"].mask, splits["val"].mask)
    trainer.base = base
    if resumed_from is not None:
        trainer.restore(resumed_from)
        saved_windows = ckpt.read_state(resumed_from)["sampler"].get("n_windows")
        if saved_windows not in (None, trainer.sampler.n_windows):
            raise DataError(f"the training data of {run_dir} changed since it was trained "
                            f"({trainer.sampler.n_windows} windows, the run had {saved_windows})",
                            f"put back {config.data.dataset} as it was, or start a new run")
        if trainer.step >= trainer.total_steps:
            total = trainer.total_steps
            done = (f"is at step {trainer.step}, past the {total} asked for"
                    if trainer.step > total else
                    f"already finished its {total} step{'s' * (total != 1)}")
            raise ConfigError(f"{run_dir} {done}",
                              "raise train.max_steps (or train.epochs) to train further")
        if dist.is_main:
            metrics.truncate_after(trainer.step)
            atomic_write_text(run_dir / layout.CONFIG_FILE, config.to_yaml())  # changes
    packed = splits["train"].packed
    example = (None if packed is None else
               chat.example_row(packed, tokenizer, config.model.max_seq_length))
    return PreparedRun(config, run_dir, trainer, tokenizer, device, resumed_from, notes,
                       example)
