"""``minigpt generate``: a prompt in, streamed continuations out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.options import (
    Device,
    MaxNewTokens,
    MinP,
    ModelDir,
    Quantize,
    RepetitionPenalty,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    sampling_settings,
)
from minigpt_cli.errors import MiniGPTError

if TYPE_CHECKING:
    from minigpt_cli.generate.decoding import SamplingSettings
    from minigpt_cli.generate.engine import GenerationResult

EXAMPLES = """Examples:

  minigpt generate --prompt 'ROMEO:'    # the latest run under runs/

  minigpt generate --model runs/tiny --prompt 'Once upon a time' --max-new-tokens 400

  minigpt generate --prompt 'def main(' --temperature 0    # greedy

  minigpt generate --prompt-file story.txt --top-p 0.9 --num-samples 3 --seed 1

  echo 'The meaning of life is' | minigpt generate --stop '\\n' --json

  minigpt generate --model runs/sft --chat --prompt 'What is 2+3?'    # the reply alone
"""

def register(app: typer.Typer) -> None:
    app.command("generate", epilog=EXAMPLES)(generate)


@ui.guarded
def generate(
    model: ModelDir = None,
    prompt: Annotated[str | None, typer.Option(
        help="Text to continue. Without it (and without --prompt-file) the prompt is read "
             "from stdin when that is not a terminal; else generation starts from scratch.")
    ] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help="Read the prompt from this UTF-8 file ('-': stdin); a "
                                "leading byte-order mark is skipped.")] = None,
    max_new_tokens: MaxNewTokens = 200,
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    num_samples: Annotated[int, typer.Option(
        "--num-samples", help="Independent samples, generated together as a batch.")] = 1,
    device: Device = "auto",
    quantize: Quantize = "none",
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the samples, settings and speed as JSON instead of streaming.")
    ] = False,
    chat: Annotated[bool, typer.Option(
        "--chat", help="The prompt is one user message in the run's chat template; the "
                       "output is the assistant's reply alone, ending at its end of turn.")
    ] = False,
    template: Annotated[str | None, typer.Option(
        help="With --chat: the chat template to use instead of the run's.")] = None,
) -> None:
    """Continue a prompt with a trained model, streaming the text as it is generated."""
    settings = sampling_settings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
        num_samples=num_samples)
    text = read_prompt(prompt, prompt_file)
    from minigpt_cli.device import configure_backends, select_device
    from minigpt_cli.generate.engine import Engine, GenerationResult, Notice
    from minigpt_cli.generate.quant import check_quantize, int4_fallback_note, quantize_model
    from minigpt_cli.run.load import load_run

    dev = select_device(device)
    configure_backends(dev)
    quantize = check_quantize(quantize, dev)
    run = load_run(model, dev)
    quantize_model(run.model, quantize)
    if note := int4_fallback_note(run.model, quantize):
        ui.warn(note)
    engine = Engine(run.model, run.tokenizer, dev)
    if template is not None and not chat:
        raise MiniGPTError("--template goes with --chat", "add --chat, or leave it out")
    shown, stop_ids, prompt_ids, warnings, prefix = text, (), text, [], ""
    if chat:
        from minigpt_cli.chat.template import template_for_run

        tmpl = template_for_run(run.run_dir, template)
        tmpl.check_tokenizer(run.tokenizer)
        prompt_ids = tmpl.render(run.tokenizer, [{"role": "user", "content": text}],
                                 add_generation_prompt=True).ids
        settings.stop = [*tmpl.stops, *settings.stop]
        shown, stop_ids, prefix = "", tmpl.stop_ids(run.tokenizer), tmpl.reply_prefix
    elif not text and (prompt is not None or prompt_file is not None
                       or not sys.stdin.isatty()):
        warnings.append("the prompt is empty: generating from the start of a new document "
                        "(end-of-text)")
        ui.warn(warnings[-1])
    engine.check_memory(num_samples)  # before a sample's header is shown
    events = engine.generate(prompt_ids, settings, stop_ids, reply=chat, reply_prefix=prefix)
    if json_out:
        result = None
        for event in events:
            if isinstance(event, Notice):
                ui.warn(event.message)
            elif isinstance(event, GenerationResult):
                result = event
        assert result is not None
        report = _report(run, str(dev), quantize, text, settings, result, warnings)
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    view = StreamView(ui.console, shown, num_samples)
    try:
        result = view.render(events)
    except KeyboardInterrupt:
        ui.console.out("")
        raise
    ui.err_console.print(Text(stats_line(result), style="dim"), soft_wrap=True)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file or piped stdin; a leading byte-order mark
    is skipped, as in training text, and one trailing newline of a file or stdin is dropped
    (``echo text |`` adds it)."""
    from minigpt_cli.data.files import BOM

    if prompt is not None and prompt_file is not None:
        raise MiniGPTError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None and str(prompt_file) != "-":
        if not prompt_file.is_file():
            raise MiniGPTError(f"--prompt-file {prompt_file} does not exist or is not a file")
        try:
            text = prompt_file.read_bytes().removeprefix(BOM).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MiniGPTError(f"--prompt-file {prompt_file} is not UTF-8 text") from e
        except OSError as e:
            raise MiniGPTError(f"cannot read --prompt-file {prompt_file}: "
                               f"{e.strerror or e}") from e
    elif prompt_file is not None or not sys.stdin.isatty():
        try:  # the bytes: in a C or C.UTF-8 locale sys.stdin passes bad ones on as surrogates
            text = sys.stdin.buffer.read().removeprefix(BOM).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MiniGPTError("the prompt on stdin is not UTF-8 text") from e
    else:
        return ""
    return text[:-1] if text.endswith("\n") else text


class StreamView:
    """Streams samples to a console: the prompt dim, the continuation literally.

    Samples are shown one after another under a header each. Text of a sample that is not
    on screen yet waits until the samples before it are finished.
    """

    def __init__(self, console: Console, prompt: str, num_samples: int):
        self.console = console
        self.prompt = prompt
        self.num_samples = num_samples
        self.safe = ui.terminal_safe if console.is_terminal else (lambda s: s)
        self.out = ui.StreamWriter(console, self.safe)
        self.current = -1
        self.waiting: dict[int, list[str]] = {}
        self.finished: set[int] = set()

    def render(self, events) -> GenerationResult:
        from minigpt_cli.generate.engine import GenerationResult, Notice, SampleFinished, TextDelta

        try:
            self._advance()
            for event in events:
                if isinstance(event, TextDelta):
                    if event.sample == self.current:
                        self.out.write(event.text)
                    else:
                        self.waiting.setdefault(event.sample, []).append(event.text)
                elif isinstance(event, SampleFinished):
                    self.finished.add(event.sample)
                    if event.sample == self.current:
                        self._advance()
                elif isinstance(event, Notice):
                    self.out.flush()
                    ui.warn(event.message)
                elif isinstance(event, GenerationResult):
                    return event
        finally:  # the end, an error or Ctrl-C: nothing sampled stays unshown
            self.out.flush()
        raise AssertionError("the engine ended without a result")

    def _advance(self) -> None:
        """Close the sample on screen; open the next, with whatever it has so far."""
        while True:
            self.out.flush()
            if self.current >= 0:
                self.console.out("")
            self.current += 1
            if self.current >= self.num_samples:
                return
            if self.num_samples > 1:
                header = f"sample {self.current + 1}/{self.num_samples}"
                self.console.rule(Text(header), style="dim", align="left")
            if self.prompt:
                self.console.out(self.safe(self.prompt), style="dim", end="")
            self.out.write("".join(self.waiting.pop(self.current, [])))
            if self.current not in self.finished:
                return


def stats_line(result: GenerationResult) -> str:
    return (f"{result.generated_tokens} tokens in {result.elapsed:.2f} s · "
            f"{result.tokens_per_second:.1f} tokens/s · first token "
            f"{result.time_to_first_token * 1000:.0f} ms · seed {result.seed}")


def _report(run, device: str, quantize: str | None, prompt: str, settings: SamplingSettings,
            result: GenerationResult, warnings: list[str]) -> dict:
    """What ``--json`` prints; ``warnings`` are the command's own, before the engine's."""
    return {
        "model": str(run.run_dir),
        "step": run.state.get("step"),
        "tokenizer": run.tokenizer.spec,
        "device": device,
        "quantize": quantize,
        "prompt": prompt,
        "prompt_tokens": result.prompt_tokens,
        "prompt_cropped": result.prompt_cropped,
        "warnings": [*warnings, *result.warnings],
        "settings": {**settings.to_dict(), "seed": result.seed},
        "samples": [{"text": s.text, "num_tokens": len(s.tokens),
                     "finish_reason": s.finish_reason} for s in result.samples],
        "generated_tokens": result.generated_tokens,
        "tokens_per_second": round(result.tokens_per_second, 2),
        "time_to_first_token_s": round(result.time_to_first_token, 4),
        "elapsed_s": round(result.elapsed, 4),
    }
