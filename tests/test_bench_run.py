"""bench/run.py: --set (a deploy file changed for one benchmark run, which the server's own config check reads) and
stopping a benchmark while its server starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.run import config_with
from server.config import load_deploy_file
from server.errors import ConfigError
from tests.strategy_cases import REPO


def test_set_changes_one_key_of_the_chorus_args_and_keeps_the_rest(tmp_path):
    path = config_with(str(REPO / "deploy" / "local.yaml"),
                       ["groups.smollm2.max_step_tokens=64", "frontend.limits.max_tokens=512"], tmp_path / "c.yaml")
    changed, original = load_deploy_file(path).chorus, load_deploy_file(REPO / "deploy" / "local.yaml").chorus
    assert changed.groups["smollm2"].max_step_tokens == 64
    assert changed.frontend.limits.max_tokens == 512
    assert changed.groups["smollm2"].guides == original.groups["smollm2"].guides
    assert changed.models == original.models


def test_bad_settings_are_refused_here_or_by_the_config_check(tmp_path):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        config_with(str(REPO / "deploy" / "local.yaml"), ["max_step_tokens"], tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="default_model is not a mapping"):
        config_with(str(REPO / "deploy" / "local.yaml"), ["default_model.x=1"], tmp_path / "c.yaml")
    path = config_with(str(REPO / "deploy" / "local.yaml"), ["groups.smollm2.max_stepp_tokens=64"], tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="max_stepp_tokens"):
        load_deploy_file(path)


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry.name), command))
    return found


def test_a_sigterm_while_the_server_starts_leaves_no_server(tmp_path):
    """A benchmark stopped before its server serves (the SIGTERM lands in start-up) stops the server too."""
    script = tmp_path / "bench_stub.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom bench.run import with_server\n"
                      "with_server('deploy/local.yaml', Path(sys.argv[1]), lambda address: None)\n")
    bench = subprocess.Popen([sys.executable, str(script), str(tmp_path / "server.log")], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    servers = []
    try:
        deadline = time.monotonic() + 60
        while not servers and time.monotonic() < deadline and bench.poll() is None:
            servers = [pid for pid, command in _children(bench.pid) if "chorus.cli serve" in command]
            time.sleep(0.05)
        assert servers, "the benchmark never started its server"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(120) == 128 + signal.SIGTERM
        assert not Path(f"/proc/{servers[0]}").exists() or _state(servers[0]) == "Z"
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in servers:  # left behind only if the test failed
            if Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
                os.kill(pid, signal.SIGINT)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]
