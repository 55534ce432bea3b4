"""Scale-out: throughput with one and two group replicas on separate Ray nodes, the cost of the hop to a replica on
the other node, and the recovery from a killed replica.

    .venv/bin/python -m bench.scale [--clients 16] [--requests 64] [--max-tokens 32] [--probe-s 40] [--name scale]
    make bench-scale

On a Ray cluster of two nodes on this machine (bench/cluster.py: 127.0.0.2 and 127.0.0.3, one CPU each, so each
replica has one core), the embedded default (deploy/local.yaml, one torch thread a replica) deployed with `chorus
serve --address`, once with 1 group replica and once with 2 (`max_replicas_per_node: 1`: one on each node); one
front end (on whichever node Serve places it).

  throughput  `--clients` closed-loop clients send greedy chat requests of `--max-tokens` tokens back to back until
              `--requests` are done; completion tokens/s over the wall time. Ratio: 2 replicas / 1.
  second hop  with 2 replicas, one request at a time (a one-token answer: one prefill), 40 requests; each request's
              log line names the replica that served it, so the latencies split into those served on the front
              end's node and those served across nodes. Both nodes are this machine: the split shows Ray's cost of a
              call to another raylet, not a network's.
  recovery    a request (two tokens) is sent every 0.5 s, each on its own thread with a 90 s deadline; after 5 s one
              group replica is killed (SIGKILL; with 2 replicas the one on the second node). Recovery = time from
              the kill to the first answer to a request sent after it; and how many requests sent after the kill
              failed (with 2 replicas: none should).
Writes <out>/<name>.json, .md and .png. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.cluster import HEAD, WORKER, LocalRayCluster
from bench.run import ROOT, Progress, free_port, log_tail, machine_info, percentile, prompt, write_report


def deploy_file(folder: Path, replicas: int) -> Path:
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["groups"]["smollm2"]["torch_threads"] = 1
    for deployment in app["deployments"]:
        if deployment["name"].startswith("group-"):
            deployment.update(num_replicas=replicas, max_replicas_per_node=1)
    path = folder / f"scale-{replicas}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Deployment:
    """`chorus serve --address` onto the cluster with a deploy file; its one front end binds the address of the
    node Serve puts it on (`node`)."""

    def __init__(self, cluster: LocalRayCluster, config: Path, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chorus.cli", "serve", "--config", str(config), "--address", cluster.address,
             "--host", "node-ip", "--port", str(free_port())],
            cwd=ROOT, env={**cluster.env, "PYTHONUNBUFFERED": "1"}, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not (ready := re.search(r"\[chorus\] ready: chorus.v1.Decoding on (\S+) ", log_path.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not become ready:\n{log_tail(log_path)}")
            time.sleep(1)
        self.address = ready.group(1)
        self.node = self.address.rsplit(":", 1)[0]

    def replica_of(self, request_id: str, timeout: float = 30) -> str:
        """The `replica=<id>@<node>` of a request's log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(rf"request id={re.escape(request_id)} .*? replica=(\S+)", self.log_path.read_text())
            if match:
                return match.group(1)
            time.sleep(0.2)
        raise RuntimeError(f"no log line for request {request_id}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def chat(i: int, max_tokens: int, request_id: str = ""):
    from chorus.v1 import decoding_pb2 as pb
    return pb.GenerateRequest(request_id=request_id, messages=[pb.ChatMessage(role="user", content=prompt(i))],
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def throughput(stub, clients: int, requests: int, max_tokens: int) -> dict:
    counter = iter(range(requests))
    lock = threading.Lock()
    tokens, latencies = [], []

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            begun = time.perf_counter()
            response = stub.Generate(chat(i, max_tokens), timeout=600)
            with lock:
                tokens.append(response.usage.completion_tokens)
                latencies.append(time.perf_counter() - begun)

    stub.Generate(chat(10_000, 4), timeout=120)  # warm-up
    begun = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - begun
    return {"tokens_per_s": sum(tokens) / wall, "requests": len(tokens), "wall_s": wall,
            "latency_s_p50": percentile(latencies, 50), "latency_s_p99": percentile(latencies, 99)}


def second_hop(stub, deployment: Deployment, requests: int = 40) -> dict:
    same, across = [], []
    for i in range(requests):
        request_id = f"hop-{i}-{time.time_ns()}"
        begun = time.perf_counter()
        stub.Generate(chat(i, 1, request_id), timeout=60)
        took = 1000 * (time.perf_counter() - begun)
        node = deployment.replica_of(request_id).rsplit("@", 1)[1]
        (same if node == deployment.node else across).append(took)
    return {"same_node_ms_p50": statistics.median(same) if same else None, "same_node_requests": len(same),
            "across_nodes_ms_p50": statistics.median(across) if across else None, "across_requests": len(across)}


# One probe every half second: a load one replica carries with room to spare here (at 0.2 s, 5 chat prefills a
# second, the single replica's queue already grew before any kill).
PROBE_INTERVAL_S = 0.5


def recovery(stub, cluster: LocalRayCluster, node: str, probe_s: float) -> dict:
    """Probes every PROBE_INTERVAL_S, kills the group replica on `node` after 5 s."""
    import grpc

    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, status) in seconds from the start
    lock = threading.Lock()
    start = time.perf_counter()

    def probe(i: int) -> None:
        sent = time.perf_counter() - start
        try:
            stub.Generate(chat(i, 2), timeout=90)
            status = "OK"
        except grpc.RpcError as error:
            status = error.code().name
        with lock:
            outcomes.append((sent, time.perf_counter() - start, status))

    threads, killed_at, i = [], None, 0
    while time.perf_counter() - start < probe_s:
        if killed_at is None and time.perf_counter() - start >= 5:
            [pid] = cluster.group_replicas(node)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.perf_counter() - start
        thread = threading.Thread(target=probe, args=(i,))
        thread.start()
        threads.append(thread)
        i += 1
        time.sleep(PROBE_INTERVAL_S)
    for thread in threads:
        thread.join(120)
    after = [o for o in outcomes if o[0] >= killed_at]
    served = [answered for sent, answered, status in after if status == "OK"]
    before = [answered - sent for sent, answered, status in outcomes if answered < killed_at and status == "OK"]
    return {"recovery_s": (min(served) - killed_at) if served else None,
            "latency_s_p50_before_kill": percentile(before, 50),
            "sent_after_kill": len(after), "failed_after_kill": sum(1 for o in after if o[2] != "OK"),
            "statuses_after_kill": sorted({o[2] for o in after}),
            "in_flight_at_kill_failed": sum(1 for s, a, st in outcomes if s < killed_at <= a and st != "OK"),
            # every probe: seconds from the kill to its sending, its latency, its status
            "probes": sorted((sent - killed_at, answered - sent, status) for sent, answered, status in outcomes)}


def markdown(report: dict) -> str:
    one, two = report["replicas_1"], report["replicas_2"]
    hop = two["second_hop"]
    lines = [
        f"Scale-out on a two-node Ray cluster on one machine ({report['machine']['cpus']} cores; each replica one "
        f"core), SmolLM2-135M, {report['clients']} clients, {report['max_tokens']} greedy tokens a request "
        f"({report['machine']['date']}):",
        "",
        "| replicas | tokens/s | latency p50 | latency p99 | probe latency before the kill | kill → first new "
        "request served | new requests failed |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, row in (("1", one), ("2 (one per node)", two)):
        rec = row["recovery"]
        recovered = f"{rec['recovery_s']:.1f} s" if rec["recovery_s"] is not None else "never"
        lines.append(f"| {n} | {row['throughput']['tokens_per_s']:.1f} | {row['throughput']['latency_s_p50']:.1f} s | "
                     f"{row['throughput']['latency_s_p99']:.1f} s | {rec['latency_s_p50_before_kill']:.2f} s | "
                     f"{recovered} | {rec['failed_after_kill']} of {rec['sent_after_kill']} |")
    lines += ["", f"2 replicas / 1: **{report['throughput_ratio']:.2f}×** the throughput."]
    if hop["same_node_ms_p50"] and hop["across_nodes_ms_p50"]:
        lines.append(f"The second hop (a one-token request, one at a time): served on the front end's node "
                     f"{hop['same_node_ms_p50']:.0f} ms p50 ({hop['same_node_requests']} requests), on the other "
                     f"node {hop['across_nodes_ms_p50']:.0f} ms ({hop['across_requests']} requests): "
                     f"{report['hop_ratio']:.2f}×.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"1 replica": report["replicas_1"], "2 replicas (one per node)": report["replicas_2"]}
    colors = ["#999", "#36c"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    left.bar(["1", "2"], [r["throughput"]["tokens_per_s"] for r in rows.values()], color=colors)
    left.set_xlabel("group replicas")
    left.set_ylabel("completion tokens/s")
    left.set_title(f"throughput, {report['clients']} clients")
    for (label, row), color in zip(rows.items(), colors):
        probes = row["recovery"]["probes"]
        ok = [(t, latency) for t, latency, status in probes if status == "OK"]
        failed = [(t, latency) for t, latency, status in probes if status != "OK"]
        right.scatter(*zip(*ok), s=8, color=color, label=f"{label}: {row['recovery']['failed_after_kill']} failed")
        if failed:
            right.scatter(*zip(*failed), s=20, color="red", marker="x")
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel("request sent, seconds from the replica kill")
    right.set_ylabel("latency (s)")
    right.set_title(f"a 2-token request every {PROBE_INTERVAL_S:g} s; one replica killed at 0")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput run")
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    parser.add_argument("--probe-s", dest="probe_s", type=float, default=40, help="seconds of recovery probing")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import grpc

    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    load_before = os.getloadavg()
    progress = Progress(total=5)
    report = {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens}
    begun = time.time()
    folder = Path(tempfile.mkdtemp(prefix="chorus-scale-"))
    cluster = LocalRayCluster(folder)
    progress.line(f"starting a two-node Ray cluster ({HEAD}, {WORKER})")
    cluster.start()
    try:
        for replicas in (1, 2):
            row = report[f"replicas_{replicas}"] = {}
            progress.line(f"deploying with {replicas} group replica(s)")
            deployment = Deployment(cluster, deploy_file(folder, replicas), folder / f"server-{replicas}.log")
            try:
                with grpc.insecure_channel(deployment.address) as channel:
                    stub = pb_grpc.DecodingStub(channel)
                    progress.begin(f"throughput, {replicas} replica(s)")
                    row["throughput"] = throughput(stub, args.clients, args.requests, args.max_tokens)
                    progress.end(f"{row['throughput']['tokens_per_s']:.1f} tokens/s")
                    if replicas == 2:
                        progress.begin("second hop")
                        row["second_hop"] = second_hop(stub, deployment)
                        progress.end(str(row["second_hop"]))
                    victim = WORKER if replicas == 2 else next(
                        n for n in (HEAD, WORKER) if cluster.group_replicas(n))
                    progress.begin(f"recovery, {replicas} replica(s), killing the replica on {victim}")
                    row["recovery"] = recovery(stub, cluster, victim, args.probe_s)
                    progress.end(", ".join(f"{k} {v}" for k, v in row["recovery"].items() if k != "probes"))
            finally:
                deployment.stop()
    finally:
        cluster.stop()
    report["throughput_ratio"] = (report["replicas_2"]["throughput"]["tokens_per_s"]
                                  / report["replicas_1"]["throughput"]["tokens_per_s"])
    hop = report["replicas_2"]["second_hop"]
    if hop["same_node_ms_p50"] and hop["across_nodes_ms_p50"]:
        report["hop_ratio"] = hop["across_nodes_ms_p50"] / hop["same_node_ms_p50"]
    report["machine"] = machine_info(load_before)
    report["run_s"] = time.time() - begun
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
