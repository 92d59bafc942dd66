"""``transfiner serve``: its defaults, and what it refuses before serving (flags that do not go
together, a device or port it cannot use, a model it cannot load), in one line and exit 2."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support import REPO
from transfiner.service.loadtest.servers import SERVE_COMMAND

pytestmark = pytest.mark.timeout(300)


def test_serve_defaults_and_missing_model(capsys):
    from transfiner.cli.main import build_parser, main
    from transfiner.cli.serve import settings_from_args

    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert (settings.model, settings.host, settings.port) == ("default", "127.0.0.1", 8000)
    assert (settings.grpc_port, settings.grpc_message_bytes) == (8001, settings.max_body_bytes)
    flags = build_parser().parse_args(["serve", "--grpc-port", "9001", "--grpc-max-message-bytes", "4096"])
    assert (settings_from_args(flags).grpc_port, settings_from_args(flags).grpc_message_bytes) == (9001, 4096)
    flags = build_parser().parse_args(["serve", "--model", "x.pth", "--max-batch-size", "8", "--device", "cpu"])
    settings = settings_from_args(flags)
    assert (settings.model, settings.max_batch_size, settings.device) == ("x.pth", 8, "cpu")
    assert main(["serve", "--model", "/nonexistent/model.pth"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_serve_takes_a_model_repository_or_a_model(tmp_path, monkeypatch, capsys):
    from transfiner.cli.main import build_parser, main
    from transfiner.cli.serve import settings_from_args

    (tmp_path / "m" / "1").mkdir(parents=True)
    flags = ["serve", "--model-repository", str(tmp_path), "--default-model", "m", "--repository-poll-s", "2"]
    settings = settings_from_args(build_parser().parse_args([*flags, "--max-loaded-models", "3"]))
    assert (settings.model_repository, settings.default_model) == (str(tmp_path), "m")
    assert (settings.repository_poll_s, settings.max_loaded_models) == (2.0, 3)
    monkeypatch.setenv("TRANSFINER_MODEL_REPOSITORY", str(tmp_path))
    assert settings_from_args(build_parser().parse_args(["serve"])).model_repository == str(tmp_path)
    assert main(["serve", "--model-repository", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"error: the model repository {tmp_path / 'missing'} is not a folder\n"
    assert main(["serve", "--model-repository", str(tmp_path), "--model", "default", "--port", "0"]) == 2
    assert capsys.readouterr().err == "error: give --model or --model-repository, not both\n"


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "error: device: not a device: 'tpu' (use cpu, cuda, cuda:N or auto)\n"),
        ("cuda:99", "error: cuda:99 is not available here"),
    ],
)
def test_serve_refuses_a_device_it_cannot_use_in_one_line(device, message, capsys):
    from transfiner.cli.main import main

    assert main(["serve", "--device", device, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_serve_on_a_port_in_use_says_so_and_exits_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            *SERVE_COMMAND,
            "--model",
            "default",
            "--device",
            "cpu",
            "--port",
            str(port),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "ready:" not in done.stderr  # refused before the model loaded


def test_serve_on_a_grpc_port_in_use_says_so_and_exits_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [*SERVE_COMMAND, "--model", "default", "--device", "cpu", "--port", "0", "--grpc-port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: gRPC: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "ready:" not in done.stderr  # refused before the model loaded


def test_serve_exits_when_its_model_cannot_be_loaded(tmp_path):
    """A server whose model failed to load could never answer: it exits 2 with the reason (so that
    Docker or Kubernetes restarts it), instead of staying up with its liveness probe passing."""
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    command = [
        *SERVE_COMMAND,
        "--model",
        str(broken),
        "--device",
        "cpu",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--log-level",
        "critical",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: model failed to load: CheckpointError: cannot read checkpoint"), done.stderr
    # At the default log level the log says why too, in a line: a corrupt file is no bug of ours.
    done = subprocess.run(command[:-2], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "cannot read checkpoint" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "2"], "--replicas: only with --engine ray"),
        (["--engine", "ray", "--replicas", "2", "--max-replicas", "3"], "either --replicas or"),
        (["--engine", "ray", "--min-replicas", "1"], "needs both --min-replicas and --max-replicas"),
        (["--engine", "ray", "--workers", "2"], "each replica runs one model worker"),
        (["--engine", "ray", "--worker-process"], "each replica is a process of Ray's own"),
        (["--engine", "ray", "--upscale-delay-s", "1"], "only with --min-replicas/--max-replicas"),
        (["--engine", "ray", "--port", "0"], "needs a fixed --port"),
        (["--engine", "ray", "--grpc-port", "9001"], "--engine ray serves HTTP only"),
    ],
)
def test_serve_engine_flags_are_checked_before_anything_starts(flags, message, capsys):
    from transfiner.cli.main import main

    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err
