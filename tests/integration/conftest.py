"""The real server as a separate process: `chorus serve` with a deploy file (Ray Serve + the grpc.aio front end + an
engine on the real SmolLM2 weights) on a free port, once per test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from chorus.v1 import decoding_pb2_grpc as pb_grpc
from server.health import wait_until_serving

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return set(out.split())


class Server:
    def __init__(self, config: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = ROOT / ".pytest_cache" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", config, "--port", str(self.port)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, timeout: float = 600) -> None:
        exited = lambda: f"server exited with {self.proc.returncode}" if self.proc.poll() is not None else None  # noqa: E731
        error = wait_until_serving(self.address, timeout, exited)
        if error:
            raise RuntimeError(f"{error}:\n{self.log()[-4000:]}")

    def stop(self, sig=signal.SIGINT, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(request, model_path):
    """One server per test module, for the deploy file the module names in CONFIG (default deploy/local.yaml)."""
    before = ray_processes()
    server = Server(getattr(request.module, "CONFIG", "deploy/local.yaml"))
    try:
        server.wait_serving()
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"server exited with {code} on SIGINT:\n{server.log()[-3000:]}"
    assert ray_processes() <= before, "Ray processes were left behind"


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.DecodingStub(channel)
