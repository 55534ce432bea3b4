"""`make soak`: a bounded soak of the real server (`chorus serve` on deploy/local.yaml, loopback only).

`--clients` threads (16) send a mix of requests for `--duration` seconds (600): plain (unary and streamed), every
token-level strategy, best-of-N and Rerank; some streams are cancelled after a few tokens and some calls get deadlines
that expire mid-work. Meanwhile, every `--sample` seconds, it records the resident memory (RSS) of every process of
the server (the `chorus serve` driver, Ray's processes, the front end and group replicas) and the group's KV cache
in use, running and waiting from the server's own metrics (Ray's Prometheus port). It reports requests by status,
lost requests (an answer without exactly one server log line, a stream that ended without its last message, a
failure other than a status) and hung ones (a call that outlived its deadline by `HUNG_AFTER_S`), both targets
zero, and the memory slope after warm-up (a least-squares line through each process's RSS after the first quarter
of the run), with a plot: bench/results/<name>.{json,md,png}.

tests/integration/test_server.py runs `soak()` for a short time against its own server.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from bench.cluster import descendants
from bench.run import free_port, start_server, stop_server, write_report
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc

RESULTS = Path(__file__).resolve().parent / "results"
HUNG_AFTER_S = 10.0
LONG_DEADLINE_S = 120.0
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Give me a tip for staying healthy.",
             "Explain what a prime number is.", "Write a haiku about the sea.", "How do plants make food?"]
PASSAGES = ["Paris is the capital of France.", "The Nile is a river in Africa.", "Berlin is in Germany.",
            "France borders Spain.", "The Eiffel Tower is in Paris.", "Tokyo is the capital of Japan."]
STRATEGIES = {
    "cd": dict(contrastive=pb.ContrastiveDecoding()),
    "fusion": dict(logit_fusion=pb.LogitFusion()),
    "refusal": dict(refusal_steering=pb.RefusalSteering()),
    "entropy-switch": dict(entropy_switch=pb.EntropySwitch()),
    "best-of-n": dict(best_of_n=pb.BestOfN(n=2, judge_max_tokens=8)),
}
KINDS = ["plain", "plain-stream", "plain-stream", *STRATEGIES, "rerank"]


@dataclasses.dataclass
class Outcome:
    kind: str
    request_id: str
    status: str
    seconds: float
    deadline_s: float
    cancelled: bool = False
    lost: str = ""  # why the answer is incomplete, if it is


def _chat(rng: random.Random, request_id: str, **strategy) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, messages=[pb.ChatMessage(role="user",
                                                                              content=rng.choice(QUESTIONS))],
                              sampling=pb.SamplingParams(max_tokens=rng.randint(8, 32), temperature=0.7,
                                                         seed=rng.randrange(2**31)), **strategy)


def one_request(stub, rng: random.Random, request_id: str) -> Outcome:
    """A request of a random kind; 15% with a deadline of 0.2-2 s, a third of the streams cancelled early."""
    kind = rng.choice(KINDS)
    deadline_s = rng.uniform(0.2, 2.0) if rng.random() < 0.15 else LONG_DEADLINE_S
    cancel_after = rng.randint(1, 4) if kind == "plain-stream" and rng.random() < 1 / 3 else None
    started = time.monotonic()
    outcome = Outcome(kind, request_id, "OK", 0.0, deadline_s)
    try:
        if kind == "rerank":
            answer = stub.Rerank(pb.RerankRequest(request_id=request_id, query=rng.choice(QUESTIONS),
                                                  passages=rng.sample(PASSAGES, 5)), timeout=deadline_s)
            if sorted(answer.ranking) != list(range(5)):
                outcome.lost = f"ranking {list(answer.ranking)}"
        elif kind == "plain-stream":
            stream = stub.GenerateStream(_chat(rng, request_id), timeout=deadline_s)
            last = None
            for count, message in enumerate(stream, start=1):
                last = message
                if count == cancel_after and not message.finish_reason:
                    stream.cancel()
                    outcome.status, outcome.cancelled = "CANCELLED", True
                    break
            if not outcome.cancelled and (last is None or not last.finish_reason):
                outcome.lost = "the stream ended without its last message"
        else:
            answer = stub.Generate(_chat(rng, request_id, **STRATEGIES.get(kind, {})), timeout=deadline_s)
            if not answer.finish_reason:
                outcome.lost = "an answer without finish_reason"
    except grpc.RpcError as error:
        outcome.status = error.code().name
    except Exception as error:  # noqa: BLE001  (anything but a status is a lost request)
        outcome.status, outcome.lost = "CLIENT_ERROR", f"{type(error).__name__}: {error}"
    outcome.seconds = time.monotonic() - started
    return outcome


def rss_by_process(root_pid: int, names: dict[int, str]) -> dict[str, int]:
    """RSS in bytes of `root_pid` and every process below it, by "<role> (<pid>)". `names` keeps each pid's first
    name: Ray retitles a worker with the method it runs (`ServeReplica:app:group.handle_request`)."""
    processes = {root_pid: "chorus serve", **descendants(root_pid)}
    rss = {}
    for pid, args in processes.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            name = names.setdefault(pid, "chorus serve" if pid == root_pid else _role(args))
            rss[f"{name} ({pid})"] = int(match.group(1)) * 1024
    return rss


def _role(args: str) -> str:
    """A short name for a process: Ray's title (`ray::ServeReplica:chorus:frontend`), a Python script's file name,
    else the executable's."""
    words = args.split() or ["?"]
    if words[0].startswith("ray::"):
        return words[0][len("ray::"):]
    if Path(words[0]).name.startswith("python"):
        script = next((w for w in words[1:] if w.endswith(".py")), " ".join(words[1:3]))
        return Path(script).name[:60]
    return Path(words[0]).name


def scrape_load(metrics_port: int) -> dict[str, float]:
    """The group gauges (summed over replicas) from Ray's Prometheus port."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = {"ray_chorus_kv_cache_usage": "kv_cache_usage", "ray_chorus_running_sequences": "running",
              "ray_chorus_waiting_requests": "waiting"}
    load = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            load[wanted[family.name]] = sum(s.value for s in family.samples)
    return load


def soak(address: str, server_pid: int, metrics_port: int, duration_s: float, clients: int, sample_s: float,
         seed: int = 0) -> dict:
    """Runs the mix against `address` for `duration_s` and returns outcomes and samples (see the module)."""
    outcomes: list[Outcome] = []
    samples: list[dict] = []
    stop = threading.Event()
    started = time.monotonic()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DecodingStub(channel)
            count = 0
            while not stop.is_set():
                count += 1
                outcomes.append(one_request(stub, rng, f"soak-{index}-{count}"))

    def sampler() -> None:
        names: dict[int, str] = {}
        while True:
            sample = {"t": time.monotonic() - started, "rss": rss_by_process(server_pid, names)}
            try:
                sample.update(scrape_load(metrics_port))
            except OSError as error:
                sample["scrape_error"] = str(error)
            samples.append(sample)
            if stop.wait(sample_s):
                break

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    for thread in threads:
        thread.start()
    time.sleep(duration_s)
    stop.set()
    for thread in threads:
        thread.join(LONG_DEADLINE_S + HUNG_AFTER_S)
    still_running = sum(thread.is_alive() for thread in threads)
    watcher.join(30)
    return {"outcomes": outcomes, "samples": samples, "clients_still_running": still_running,
            "duration_s": time.monotonic() - started}


def check_server_log(outcomes: list[Outcome], log: str) -> dict:
    """Lost requests by the server's log: an OK answer needs exactly one log line with status=OK, and no request
    may have more than one line."""
    lines = collections.Counter(re.findall(r"request id=(soak-\d+-\d+) .*status=(\w+)", log))
    per_id = collections.Counter(request_id for request_id, _ in lines.elements())
    lost = []
    for outcome in outcomes:
        if outcome.status == "OK" and not outcome.cancelled and lines[(outcome.request_id, "OK")] != 1:
            lost.append(f"{outcome.request_id}: answered OK, {per_id[outcome.request_id]} log lines")
        elif per_id[outcome.request_id] > 1:
            lost.append(f"{outcome.request_id}: {per_id[outcome.request_id]} log lines")
    return {"lost_by_log": lost}


def slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, bytes) points, in MiB per minute."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60 / 2**20


def summarize(run: dict, log_check: dict) -> dict:
    outcomes, samples = run["outcomes"], run["samples"]
    statuses = collections.Counter(o.status for o in outcomes)
    hung = [o.request_id for o in outcomes if o.seconds > o.deadline_s + HUNG_AFTER_S]
    lost = [f"{o.request_id}: {o.lost}" for o in outcomes if o.lost] + log_check["lost_by_log"]
    warm = [s for s in samples if s["t"] >= samples[-1]["t"] / 4] if samples else []
    processes = sorted({name for s in samples for name in s["rss"]})
    per_process = {}
    for name in processes:
        points = [(s["t"], s["rss"][name]) for s in warm if name in s["rss"]]
        if points:
            per_process[name] = {"slope_mib_per_min": round(slope_mib_per_min(points), 3),
                                 "first_mib": round(points[0][1] / 2**20, 1), "last_mib": round(points[-1][1] / 2**20, 1)}
    total = [(s["t"], sum(s["rss"].values())) for s in warm]
    return {
        "requests": len(outcomes), "by_status": dict(statuses.most_common()),
        "by_kind": dict(collections.Counter(o.kind for o in outcomes).most_common()),
        "lost": lost, "hung": hung, "clients_still_running": run["clients_still_running"],
        "internal": statuses.get("INTERNAL", 0) + statuses.get("UNKNOWN", 0),
        "total_rss_slope_mib_per_min": round(slope_mib_per_min(total), 3),
        "per_process": per_process,
        "kv_cache_usage_max": max((s.get("kv_cache_usage", 0.0) for s in samples), default=0.0),
        "samples": [{"t": round(s["t"], 1), "rss_mib": {k: round(v / 2**20, 1) for k, v in s["rss"].items()},
                     **{k: s[k] for k in ("kv_cache_usage", "running", "waiting") if k in s}} for s in samples],
        "duration_s": round(run["duration_s"], 1),
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Soak: {report['clients']} clients for {report['duration_s']:.0f} s on {report['config']}", "",
             f"- requests: {s['requests']} ({', '.join(f'{k} {v}' for k, v in s['by_status'].items())})",
             f"- lost: {len(s['lost'])}, hung: {len(s['hung'])}, INTERNAL/UNKNOWN: {s['internal']}, clients still "
             f"running at the end: {s['clients_still_running']}",
             f"- memory after warm-up (the first quarter left out): all processes together "
             f"{s['total_rss_slope_mib_per_min']:+.2f} MiB/min; KV cache in use at most "
             f"{100 * s['kv_cache_usage_max']:.1f}%", "",
             "| process | RSS after warm-up (MiB) | at the end (MiB) | slope (MiB/min) |", "|---|---|---|---|"]
    for name, p in sorted(report["summary"]["per_process"].items(), key=lambda kv: -kv[1]["last_mib"]):
        lines.append(f"| {name} | {p['first_mib']} | {p['last_mib']} | {p['slope_mib_per_min']:+.2f} |")
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["summary"]["samples"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    top = sorted(report["summary"]["per_process"], key=lambda n: -report["summary"]["per_process"][n]["last_mib"])[:8]
    for name in top:
        points = [(s["t"], s["rss_mib"][name]) for s in samples if name in s["rss_mib"]]
        axes[0].plot([t for t, _ in points], [v for _, v in points], label=name[:40])
    axes[0].set(title="RSS per process (the 8 largest)", xlabel="seconds", ylabel="MiB")
    axes[0].legend(fontsize=7)
    times = [s["t"] for s in samples]
    axes[1].plot(times, [100 * s.get("kv_cache_usage", 0) for s in samples], label="KV cache in use (%)")
    axes[1].plot(times, [s.get("running", 0) for s in samples], label="running sequences")
    axes[1].plot(times, [s.get("waiting", 0) for s in samples], label="waiting requests")
    axes[1].set(title="Engine load (server metrics)", xlabel="seconds")
    axes[1].legend(fontsize=8)
    statuses = report["summary"]["by_status"]
    axes[2].bar(list(statuses), list(statuses.values()))
    axes[2].set(title="Requests by status", ylabel="requests")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/local.yaml")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample", type=float, default=5, help="seconds between memory and load samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    log_path = RESULTS / f"{args.name}.server.log"
    log_path.write_text("")
    port, metrics_port = free_port(), free_port()
    server = start_server(args.config, port, log_path, metrics_port=metrics_port)
    try:
        run = soak(f"127.0.0.1:{port}", server.pid, metrics_port, args.duration, args.clients, args.sample, args.seed)
        time.sleep(3)  # the last requests' log lines
    finally:
        stop_server(server)
    summary = summarize(run, check_server_log(run["outcomes"], log_path.read_text(errors="replace")))
    report = {"config": args.config, "clients": args.clients, "duration_s": args.duration, "summary": summary,
              "command": f"make soak SOAK_ARGS='--duration {args.duration:g} --clients {args.clients}'"}
    write_report(RESULTS, args.name, report, markdown, plot)
    return 0 if not (summary["lost"] or summary["hung"] or summary["internal"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
