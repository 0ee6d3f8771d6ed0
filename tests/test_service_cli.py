"""`trimask serve` from the command line: clear one-line errors, the printed URL, the token."""
from __future__ import annotations

import socket

import pytest

from service_helpers import ServerProcess, make_images, tiny_checkpoint  # noqa: F401
from trimask.cli import main as cli_main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path, capsys, tiny_checkpoint):  # noqa: F811
    make_images(tmp_path / "images")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--images", str(tmp_path / "images"), "--annotations", str(tmp_path / "a"),
                         "--checkpoint", str(tiny_checkpoint), "--port", str(port), "--no-precompute"])
    assert code == 1
    error = _one_line_error(capsys)
    assert f"port {port}" in error and "already in use" in error and "--port" in error


def test_an_empty_image_folder_is_one_clear_line(tmp_path, capsys, tiny_checkpoint):  # noqa: F811
    (tmp_path / "empty").mkdir()
    code = cli_main(["serve", "--images", str(tmp_path / "empty"), "--annotations", str(tmp_path / "a"),
                     "--checkpoint", str(tiny_checkpoint), "--port", "0", "--no-precompute"])
    assert code == 1 and "no images found" in _one_line_error(capsys)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_binding_beyond_loopback_needs_a_token(tmp_path, capsys, monkeypatch, host):
    monkeypatch.delenv("TRIMASK_TOKEN", raising=False)
    code = cli_main(["serve", "--images", str(tmp_path), "--host", host, "--port", "0"])
    assert code == 1 and "--token" in _one_line_error(capsys)


def test_a_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    code = cli_main(["serve", "--images", str(tmp_path), "--checkpoint", str(tmp_path / "sam_vit_b.pth"),
                     "--model", "vit_b", "--port", "0"])
    assert code == 1 and "checkpoint file not found" in _one_line_error(capsys)


def test_a_server_with_a_token_prints_it_in_the_url_and_refuses_requests_without_it(tmp_path, tiny_checkpoint):  # noqa: F811
    images = make_images(tmp_path / "images")
    server = ServerProcess(images, tmp_path / "annotations", tiny_checkpoint, "--token", "t0ken")
    try:
        assert server.url_line.rstrip().endswith("/?token=t0ken  (Ctrl+C stops)")
        assert server.request("GET", "/api/images")[0] == 401
        assert server.request("GET", "/api/images", headers={"Authorization": "Bearer t0ken"})[0] == 200
        assert server.request("GET", "/api/status?token=t0ken")[0] == 200
        status, body = server.request("GET", "/")  # the page itself (no data) needs no token
        assert status == 503 or status == 200
    finally:
        server.kill()


def test_a_checkpoint_that_does_not_fit_the_model_fails_at_start_in_one_line(tmp_path, capsys, tiny_checkpoint):  # noqa: F811
    make_images(tmp_path / "images")
    code = cli_main(["serve", "--images", str(tmp_path / "images"), "--annotations", str(tmp_path / "a"),
                     "--model", "vit_t", "--checkpoint", str(tiny_checkpoint), "--port", "0", "--device", "cpu"])
    assert code == 1
    error = _one_line_error(capsys)
    assert "vit_t cannot be loaded" in error and "does not fit" in error
