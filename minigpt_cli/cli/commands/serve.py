"""``minigpt serve``: the OpenAI-compatible API and the chat page for a run."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from minigpt_cli.cli import ui
from minigpt_cli.cli.options import Device, ModelDir, Quantize
from minigpt_cli.generate.text import STREAM_INTERVAL

EXAMPLES = """Examples:

  minigpt serve    # the latest run under runs/, on http://127.0.0.1:8000

  minigpt serve --model runs/tiny --port 8080 --max-batch 16

  MINIGPT_API_KEY=secret minigpt serve --host 0.0.0.0

  minigpt serve --cors-origin http://localhost:3000    # a web app there may call the API
"""


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=EXAMPLES)(serve)


@ui.guarded
def serve(
    model: ModelDir = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every "
                                           "interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="MINIGPT_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Most sequences decoded together in one step.")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait for a slot; beyond, 429.")] = 64,
    queue_timeout: Annotated[float, typer.Option(
        "--queue-timeout", help="Seconds a request may wait for a slot.")] = 60.0,
    template: Annotated[str | None, typer.Option(
        help="Chat template for /v1/chat/completions (plain, chat, chatml, minigpt). "
             "Default: the one the run was fine-tuned with, else plain.")] = None,
    stream_interval: Annotated[float, typer.Option(
        "--stream-interval", help="Seconds a stream waits after each chunk, so that the "
        "tokens sampled meanwhile go out together; 0 sends every token alone.")
    ] = STREAM_INTERVAL,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Let web pages from this origin (e.g. http://localhost:3000, "
        "or '*' for any) call the API from a browser; repeatable. Off by default: only "
        "the page served here can.")] = None,
    quantize: Quantize = "none",
    device: Device = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible API, with a chat page at /.

    Ctrl-C exits with code 130, SIGTERM with 143, after open streams finish (up to 5 s).
    """
    from minigpt_cli.serve.server import (
        Terminated,
        build,
        check_serve_deps,
        every_interface,
        listen,
        url_of,
    )
    from minigpt_cli.serve.server import serve as run_server

    check_serve_deps()
    sock = listen(host, port)
    try:
        app, served = build(model, device, max_batch, max_queue, queue_timeout, template,
                            api_key or None, quantize, stream_interval, cors_origin or ())
    except BaseException:
        sock.close()
        raise
    from minigpt_cli.generate.quant import int4_fallback_note

    if note := int4_fallback_note(served.scheduler.model, quantize):
        ui.warn(note)
    if every_interface(sock) and not api_key:
        ui.warn(f"listening on every interface ({host}) without --api-key: anyone who can "
                "reach this machine can use the model")
    if "*" in (cors_origin or ()) and not api_key:
        ui.warn("--cors-origin '*' without --api-key: any web page open in a browser that "
                "can reach this server can use the model")
    ui.err_console.print(f"Serving [bold]{served.model_id}[/] (step {served.step}) at "
                         f"{url_of(sock)} — Ctrl-C to stop", soft_wrap=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        run_server(app, served, sock)
    except Terminated:
        ui.err_console.print("Stopped (SIGTERM).")
        raise typer.Exit(143) from None
