"""The real server as a separate process: `chorus serve` with a deploy file (Ray Serve + the grpc.aio front end + an
engine on the real SmolLM2 weights) on a free port, once per test module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bench.cluster import descendants, process_table
from bench.run import free_port
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from server.health import wait_until_serving

ROOT = Path(__file__).resolve().parents[2]


def ray_processes_of(server: "Server") -> dict[int, str]:
    """The Ray cluster processes (GCS, raylet) a running server started: pid → command line. Only its own, so a
    cluster another test process runs meanwhile (`make test` runs two) does not count."""
    return {pid: args for pid, args in descendants(server.proc.pid).items()
            if "raylet" in args or "gcs_server" in args}


def left_running(processes: dict[int, str], wait_s: float = 10) -> dict[int, str]:
    """Which of `processes` still run after up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        table = process_table()
        alive = {pid: args for pid, args in processes.items() if pid in table and table[pid][1] == args}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


class Server:
    """`chorus serve --config CONFIG --port <free port>` in its own process, logging to .pytest_cache/; `args` and
    `env` add to its command line and environment, `host` is where its (first) front end listens."""

    def __init__(self, config: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 host: str = "127.0.0.1"):
        self.config = config
        self.port = free_port()
        self.address = f"{host}:{self.port}"
        self.log_path = ROOT / ".pytest_cache" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chorus.cli", "serve", "--config", config, "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, timeout: float = 600, address: str | None = None, credentials=None) -> None:
        exited = lambda: f"server exited with {self.proc.returncode}" if self.proc.poll() is not None else None  # noqa: E731
        error = wait_until_serving(address or self.address, timeout, exited, credentials)
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
def server(request, model_path, tmp_path_factory):
    """One server per test module, for the deploy file the module names in CONFIG (default deploy/local.yaml), or
    the one CONFIG(folder) writes into a temporary folder and returns. A test may stop the server itself (it then
    checks how it stopped); otherwise it is stopped here with SIGINT and must exit 0 and take Ray with it."""
    config = getattr(request.module, "CONFIG", "deploy/local.yaml")
    if callable(config):
        config = config(tmp_path_factory.mktemp("deploy"))
    server = Server(config)
    cluster = {}
    try:
        server.wait_serving()
        cluster = ray_processes_of(server)
        yield server
    finally:
        stopped_by_a_test = server.proc.poll() is not None
        code = server.stop()
    if not stopped_by_a_test:
        assert code == 0, f"server exited with {code} on SIGINT:\n{server.log()[-3000:]}"
        assert cluster and left_running(cluster) == {}, f"Ray processes were left behind: {cluster}"


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.DecodingStub(channel)


def status_of(call) -> grpc.StatusCode:
    """The status code `call()` ends with (OK when it raises nothing)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def wait_for_load(stub, expected: tuple[int, int] = (0, 0), timeout: float = 60) -> None:
    """Polls ListModels until the default model's group has (running, waiting) requests as expected."""
    deadline = time.monotonic() + timeout
    while True:
        base = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
        seen = (base.running_requests, base.waiting_requests)
        if seen == expected:
            return
        assert time.monotonic() < deadline, f"(running, waiting) is {seen}, expected {expected}"
        time.sleep(0.1)


def wait_for_log_line(server, needle: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [line for line in server.log().splitlines() if needle in line]
        if lines:
            return lines[-1]
        time.sleep(0.5)
    raise AssertionError(f"no log line with {needle!r}")
