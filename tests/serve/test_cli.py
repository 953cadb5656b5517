"""``minigpt serve`` on the command line: bad options are one-line errors, the warnings for
every interface or any web origin without a key, the port already taken."""

from __future__ import annotations

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
