"""A Ray cluster of two nodes on this one machine, for the scale-out tests and benchmark: `ray start --head` on the
loopback address 127.0.0.2 and a second node joining it on 127.0.0.3, one CPU each (by default), so Serve places
replicas on both as it would on two machines. Token authentication with a token of its own; a temp dir of its own,
so only the processes it started are stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import free_port

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))


def process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) of every process on the machine."""
    out = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines())
    return {int(row[0]): (int(row[1]), row[2] if len(row) > 2 else "") for row in rows}


def descendants(pid: int) -> dict[int, str]:
    """pid → command line of every process below `pid`."""
    table, found, frontier = process_table(), {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, args) in table.items():
            if ppid == parent and child not in found:
                found[child] = args
                frontier.append(child)
    return found


class LocalRayCluster:
    """`start()` the head and the second node, `stop()` every process of theirs. `env` is the environment a
    process joining the cluster needs (`chorus serve --address`): the token, and Ray's log deduplication off
    (both nodes share this machine's log folder, and Ray would fold similar request lines together)."""

    def __init__(self, folder: Path, cpus_per_node: int = 1):
        self.gcs_port = free_port()
        self.address = f"{HEAD}:{self.gcs_port}"
        self.cpus_per_node = cpus_per_node
        token = folder / "ray-token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_DEDUP_LOGS": "0"}
        # Short: Ray's unix socket paths under it must fit in 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="chorus-ray-", dir="/tmp")

    def start(self) -> None:
        common = ["--num-cpus", str(self.cpus_per_node), "--object-store-memory", str(300 * 2**20),
                  "--disable-usage-stats"]
        # A node is declared dead after 3 missed health checks a second apart (Ray's default: 5 of 3 s).
        system_config = json.dumps({"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
        self._ray("start", "--head", "--node-ip-address", HEAD, "--port", str(self.gcs_port), "--include-dashboard",
                  "false", "--temp-dir", self.temp_dir, "--system-config", system_config, *common)
        self._ray("start", "--address", self.address, "--node-ip-address", WORKER, *common)

    def _ray(self, *args: str) -> None:
        done = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def raylet(self, node_ip: str) -> int:
        """The pid of a node's raylet."""
        return next(pid for pid, (_, args) in process_table().items()
                    if "/raylet " in args and f"--node_ip_address={node_ip}" in args and self.temp_dir in args)

    def group_replicas(self, node_ip: str) -> list[int]:
        """The pids of the model-group replicas on a node."""
        return [pid for pid, args in descendants(self.raylet(node_ip)).items()
                if "ServeReplica:chorus:group-" in args]

    def processes(self) -> dict[int, str]:
        """Every process of the cluster: those with its temp dir on their command line (GCS, raylets, agents) and
        all below them (workers, replicas)."""
        table = process_table()
        roots = [pid for pid, (_, args) in table.items() if self.temp_dir in args]
        found = {pid: table[pid][1] for pid in roots}
        for pid in roots:
            found.update(descendants(pid))
        return found

    def stop(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
