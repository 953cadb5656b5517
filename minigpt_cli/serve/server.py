"""Loading a run for serving and running uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.text import STREAM_INTERVAL


class Terminated(Exception):
    """SIGTERM arrived: the server stopped accepting, finished or cancelled its streams and
    shut down."""


def check_serve_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MiniGPTError(f"serving needs FastAPI and uvicorn ({e.name} is missing)",
                           "pip install 'minigpt[serve]'") from e


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, made before the model loads: an address that
    cannot be used fails early, port 0 gets a free port to print, and uvicorn serves on
    this very socket (nothing can take the port in between)."""
    if not 0 <= port <= 65535:
        raise MiniGPTError(f"port must be between 0 and 65535, got {port}", setting="port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a host name"
        raise MiniGPTError(f"host {host} is not an address of this machine: {reason}",
                           setting="host") from e
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's own backlog
    except OSError as e:
        sock.close()
        raise MiniGPTError(f"port {port} on {host} cannot be used: {e.strerror}",
                           "is another server running there? pick another port",
                           setting="port") from e
    return sock


def every_interface(sock: socket.socket) -> bool:
    """Whether the socket listens on every interface (0.0.0.0, ::, or a spelling of them
    such as ``0``), not one address."""
    return ipaddress.ip_address(sock.getsockname()[0]).is_unspecified


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# An origin as browsers send it: a scheme and a host, with a port or not, and nothing after
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def check_origins(origins: Sequence[str]) -> list[str]:
    """The web origins allowed to call the API from a browser: ``*`` or exact origins."""
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise MiniGPTError(f"cors_origin must be '*' or an origin such as "
                               f"http://localhost:3000 (a scheme and a host, with no path), "
                               f"got {origin!r}", setting="cors_origin")
    return list(origins)


def build(model_dir: Path | None, device: str, max_batch: int, max_queue: int,
          queue_timeout: float, template: str | None, api_key: str | None,
          quantize: str = "none", stream_interval: float = STREAM_INTERVAL,
          cors_origins: Sequence[str] = ()):
    """The FastAPI app for a run, with its scheduler started; returns (app, served)."""
    from minigpt_cli.chat.template import template_for_run
    from minigpt_cli.device import configure_backends, select_device
    from minigpt_cli.generate.batching import Scheduler
    from minigpt_cli.run.load import load_run
    from minigpt_cli.serve.app import ServedModel, create_app

    if template is not None:
        template_for_run(None, template)  # an unknown name: refused before the model loads
    if max_queue < 0:
        raise MiniGPTError(f"max_queue must be >= 0, got {max_queue}", setting="max_queue")
    if not queue_timeout > 0:
        raise MiniGPTError(f"queue_timeout must be > 0, got {queue_timeout}",
                           setting="queue_timeout")
    cors_origins = check_origins(cors_origins)
    if api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", api_key):
        raise MiniGPTError("api_key must be printable ASCII with no spaces: an HTTP header "
                           "cannot carry anything else", setting="api_key")
    if not 0 <= stream_interval <= 1:
        raise MiniGPTError(f"stream_interval must be between 0 and 1 second, got "
                           f"{stream_interval}", setting="stream_interval")
    from minigpt_cli.generate.quant import check_quantize, quantize_model

    dev = select_device(device)
    configure_backends(dev)
    quantize = check_quantize(quantize, dev)
    run = load_run(model_dir, dev)
    chat_template = template_for_run(run.run_dir, template)
    chat_template.check_tokenizer(run.tokenizer)
    quantize_model(run.model, quantize)
    scheduler = Scheduler(run.model, run.tokenizer, max_batch=max_batch, max_queue=max_queue,
                          queue_timeout=queue_timeout, start=False)  # ``serve`` runs it
    loss = run.state.get("best_val_loss")
    served = ServedModel(scheduler, run.tokenizer, run.run_dir.name, run.state.get("step"),
                         loss if isinstance(loss, int | float) else None,
                         run.model.config.max_seq_length, max_batch, chat_template,
                         stream_interval)
    return create_app(served, api_key, cors_origins), served


def serve(app, served, sock: socket.socket, graceful_seconds: float = 5.0) -> None:
    """Serve until Ctrl-C (KeyboardInterrupt) or SIGTERM (``Terminated``).

    The model decodes in this thread, the main one (the scheduler's ``run``): PyTorch's CPU
    kernels are faster in the thread that loaded the model. uvicorn serves HTTP in a thread
    of its own. The first Ctrl-C or SIGTERM makes uvicorn stop accepting connections and
    gives open requests ``graceful_seconds`` to finish (decoding goes on meanwhile); then
    decoding stops, the rest end with an error (a stream: an error chunk and its
    ``[DONE]``), and the signal is raised here. A second signal cuts the wait short.
    """
    import uvicorn

    # uvicorn's own deadline is a backstop: the scheduler ends what is left before it,
    # so that every open stream gets an error and its end rather than a cut connection
    # no lifespan protocol: the app has no startup or shutdown hooks (the scheduler is
    # started and closed here), and a lifespan task cut short at exit logs a traceback
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=graceful_seconds + 5, access_log=False)
    server = uvicorn.Server(config)  # in a thread that is not the main one: no signals
    received: list[int] = []
    failed: list[BaseException] = []

    def on_signal(signum, frame):
        received.append(signum)
        server.should_exit = True
        # then decoding stops, failing what is still open ("the server is shutting down"):
        # from a timer, not the handler, which may have interrupted the scheduler's own code
        timer = threading.Timer(graceful_seconds if len(received) == 1 else 0,
                                served.scheduler.close)
        timer.daemon = True  # no wait at exit when everything ended before it
        timer.start()

    def http() -> None:
        if served.scheduler.device.type == "cpu":
            _keep_to_one_core()
        try:
            server.run(sockets=[sock])
        except BaseException as e:
            failed.append(e)
        finally:
            served.scheduler.close()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="minigpt-http")
    try:
        thread.start()
        served.scheduler.run()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Terminated()


def _keep_to_one_core() -> None:
    """Keep the calling thread (uvicorn's) on the last core the process may use.

    While a stream decodes on the CPU, every core is busy: the model's thread and PyTorch's
    worker, which spins between matrix products. Each time the HTTP thread wakes (a chunk
    every 20 ms), it takes a core from one of them. Kept to one core, it only ever takes
    that one, which the model's thread then leaves to it, and it stops preempting the
    model's thread: one stream decoded 3.5-3.9% faster on 2 cores (alternating servers),
    with 16 streams unchanged. One Python thread never uses more than one core anyway.
    """
    if not hasattr(os, "sched_setaffinity"):  # Linux only
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[-1]})

