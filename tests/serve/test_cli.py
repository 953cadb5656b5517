"""``minigpt serve`` on the command line: bad options are one-line errors, the warnings for
every interface or any web origin without a key, the port already taken."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "0"], "--max-batch"),
    (["--template", "fancy"], "--template"),
    (["--queue-timeout", "0"], "--queue-timeout"),
    (["--stream-interval", "2"], "--stream-interval"),
    (["--port", "70000"], "--port"),
    (["--cors-origin", "localhost:3000"], "--cors-origin"),
    (["--cors-origin", "http://localhost:3000/app"], "--cors-origin"),
])
def test_bad_options_are_one_line_errors(cli, serve_run, args, needle):
    result = cli.invoke("serve", "--model", serve_run, "--device", "cpu", *args)
    cli.assert_one_line_error(result, needle)


def test_any_origin_without_a_key_warns(start_server):
    server = start_server("--cors-origin", "*")
    code, err = server.stop()
    assert "Warning:" in err and "--cors-origin '*' without --api-key" in err
    assert code == 143 and "Traceback" not in err


def test_a_missing_run_is_a_one_line_error(cli, tmp_path):
    cli.assert_one_line_error(cli.invoke("serve", "--model", tmp_path / "nope"), "--model")


def test_every_interface_without_a_key_warns(start_server):
    server = start_server("--host", "0.0.0.0")
    code, err = server.stop()
    assert "Warning:" in err and "without --api-key" in err
    assert code == 143 and "Traceback" not in err


def test_a_port_in_use_is_a_one_line_error(cli, serve_run, server):
    result = cli.invoke("serve", "--model", serve_run, "--device", "cpu", "--port", server.port)
    cli.assert_one_line_error(result, f"--port {server.port}", "cannot be used")


def test_port_0_prints_the_port_it_got(cli, serve_run):
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--model",
                             str(serve_run), "--device", "cpu", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", line).group(1))
        assert port > 0
        import httpx
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 143


def test_every_spelling_of_every_interface_warns(start_server):
    server = start_server("--host", "0")
    code, err = server.stop()
    assert "Warning:" in err and "without --api-key" in err and code == 143


@pytest.mark.parametrize("key", ["sécret", "two words", "tab\there"])
def test_a_key_no_header_can_carry_is_a_one_line_error(cli, serve_run, key):
    result = cli.invoke("serve", "--model", serve_run, "--device", "cpu", "--api-key", key)
    cli.assert_one_line_error(result, "--api-key")


def test_sigterm_ends_an_open_stream_with_an_error_and_its_done(start_server, byte_tok):
    """Open streams get the grace period, then an error chunk and ``[DONE]``: a client sees
    why its reply ended, and the server's log shows no traceback."""
    import threading
    import time

    import httpx

    server = start_server()
    body = {"prompt": "a", "max_tokens": 1_000_000, "stream": True,
            "logit_bias": {str(byte_tok.eot_id): -100}}
    lines: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    code, err = server.stop()
    reader.join(30)
    assert code == 143 and "Traceback" not in err and "Exception" not in err, err
    assert lines[-1] == "data: [DONE]" and '"code": "shutdown"' in lines[-2], lines[-3:]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_the_http_thread_keeps_to_the_last_core_and_the_rest_are_untouched():
    import threading

    from minigpt_cli.serve.server import _keep_to_one_core

    cores = os.sched_getaffinity(0)
    seen = []

    def http():
        _keep_to_one_core()
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=http)
    thread.start()
    thread.join()
    assert seen == [{max(cores)}] and os.sched_getaffinity(0) == cores


def test_int4_says_which_layers_stayed_int8(start_server, toy_run, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello\n")
    run = toy_run(tmp_path / "run", data, ff_dim=48)  # two layers with 48 inputs
    server = start_server("--quantize", "int4", run_dir=run)
    code, err = server.stop()
    assert "Warning:" in err and "int4: 2 of the 9 linear layers stayed int8" in err, err
    assert code == 143 and "Traceback" not in err
