"""Load benchmark: the same closed-loop load through the running server over gRPC and on the engine in-process.

    .venv/bin/python -m bench.run --config deploy/local.yaml [--concurrency 1 4 16] [--max-tokens 64]
        [--requests-per-level 8] [--repetitions 3] [--out bench/results] [--name foundation]
    .venv/bin/python -m bench.run --config deploy/local-vllm.yaml --name vllm
    .venv/bin/python -m bench.run --repetitions 1 --concurrency 1 2 --requests 2 --max-tokens 8 --name smoke

For each concurrency level c, c clients send streaming chat requests back to back until max(2c,
--requests-per-level) requests are done, after one short warm-up request. Every request is greedy with `ignore_eos`
and a fixed `max_tokens`, so each yields exactly that many tokens; prompts differ per request so no prefix is shared.
Per level: completion tokens/s (from each request's final `usage`) over the level's wall time, time to first token
(TTFT: first message with token ids), inter-token latency (ITL: gap between streamed messages / token ids in the
message), end-to-end request latency (until the stream ends), p50 and p99.

Modes, alternated within one run (never competing for the cores), --repetitions times:
  server      `chorus serve` in a separate process (Ray Serve + gRPC front end + engine), driven over gRPC;
  in_process  the same engine built from the same config in a fresh process, no Ray, no gRPC
              (for a vLLM model: AsyncLLM.generate called directly with the same SamplingParams).
Repetition r: a fresh server, every level through it, the server stopped; then a fresh in-process engine, every
level on it, its process ended. Each ratio is taken within a repetition (the two modes minutes apart) and reported
as the median and the range (min-max) over the repetitions; each level's numbers likewise.
Writes <out>/<name>.json and <out>/<name>.png. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from server.health import wait_until_serving

TOPICS = ["a lighthouse", "a lost key", "a robot gardener", "the moon", "a river", "a chess game", "a bakery",
          "a mountain", "a violin", "a storm", "a library", "a fox", "a train", "a desert", "a painter", "a comet"]
WARMUP_TOKENS = 16  # the warm-up request before a mode's (or a strategy's) levels


def prompt(i: int) -> str:
    return f"Tell me a short story about {TOPICS[i % len(TOPICS)]}, number {i}."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---- progress ----

def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per measured step on stdout: elapsed time since the run began, step k of n, what runs; a line at
    least every TICK_S seconds while a step runs, so a run is never silent for long. A child process continues
    the count from `done` with the run's `started` (time.time())."""
    TICK_S = 30

    def __init__(self, total: int, started: float | None = None, done: int = 0):
        self.total, self.done = total, done
        self.started = time.time() if started is None else started
        self._what, self._begun, self._ticked = "", 0.0, 0.0

    def line(self, text: str) -> None:
        print(f"[{clock(time.time() - self.started)}] {text}", flush=True)

    def begin(self, what: str) -> None:
        self._what, self._begun = what, time.perf_counter()
        self._ticked = self._begun
        self.line(f"({self.done + 1}/{self.total}) {what} ...")

    def tick(self, text: str) -> None:
        now = time.perf_counter()
        if now - self._ticked >= self.TICK_S:
            self._ticked = now
            self.line(f"({self.done + 1}/{self.total}) {self._what}: {text}, {now - self._begun:.0f} s")

    def end(self, outcome: str) -> None:
        self.done += 1
        self.line(f"({self.done}/{self.total}) {self._what}: {outcome} ({time.perf_counter() - self._begun:.0f} s)")

    def repetition_done(self, rep: int, reps: int, rep_started: float) -> None:
        took = time.time() - rep_started
        left = (time.time() - self.started) / (rep + 1) * (reps - rep - 1)
        self.line(f"repetition {rep + 1}/{reps} done in {clock(took)}" + (f"; about {clock(left)} left"
                                                                          if rep + 1 < reps else ""))


ROOT = Path(__file__).resolve().parents[1]


def data_bench_parser(description: str, config: str, name: str, holds: str) -> argparse.ArgumentParser:
    """The arguments every benchmark on ../shared/data shares: --config, --data (a folder holding `holds`), --name
    and --out; `parse_data_bench_args` checks them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=config)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help=f"the data folder ({holds})")
    parser.add_argument("--name", default=name, help="the results' file name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser


def parse_data_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder (see --help)")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def save_json(path: Path, data, indent: int | None = None) -> None:
    """Writes `data` to `path` as JSON through a temporary file and a rename, so a run stopped mid-write leaves the
    earlier file whole (what a later --resume reads)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=indent))
    temporary.replace(path)


def write_report(out: Path, name: str, report: dict, markdown, plot) -> None:
    """<out>/<name>.json, .md (`markdown(report)`, printed too) and .png (`plot(report, path)`)."""
    save_json(out / f"{name}.json", report, indent=2)
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    plot(report, out / f"{name}.png")
    print(table)
    print(f"wrote {out / name}.{{json,md,png}}" + (f" in {report['run_s']:.0f} s" if "run_s" in report else ""))


def resumed(path: Path, settings: dict, key: str) -> list[dict]:
    """The measured entries under `key` of an earlier report at `path` (none if absent), for a --resume run;
    SystemExit naming the difference if that report was measured with settings other than `settings`."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    differ = {name: (earlier.get(name), value) for name, value in settings.items() if earlier.get(name) != value}
    if differ:
        raise SystemExit(f"--resume: {path} was measured with other settings (earlier, now): {differ}; "
                         "pass the same settings, or another --name")
    return earlier[key]


def level_outcome(summary: dict) -> str:
    return (f"{summary['tokens_per_s']:.1f} tok/s, ITL p50 {summary['itl_ms_p50']:.0f} ms, "
            f"p99 {summary['itl_ms_p99']:.0f} ms")


# ---- one level ----

class Recorder:
    """Timestamps of one request's stream."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.last = self.start
        self.itl: list[float] = []
        self.ids = 0  # token ids streamed
        self.completion_tokens: int | None = None  # from the final usage
        self.end = None

    def tokens_arrived(self, count: int) -> None:
        if not count:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.itl.extend([(now - self.last) / count] * count)
        self.last = now
        self.ids += count

    def finished(self, completion_tokens: int) -> "Recorder":
        self.end = time.perf_counter()
        self.completion_tokens = completion_tokens
        return self

    @property
    def tokens(self) -> int:
        return self.ids if self.completion_tokens is None else self.completion_tokens


def summarize(records: list[Recorder], wall: float) -> dict:
    ttft = [r.first - r.start for r in records]
    itl = [x for r in records for x in r.itl]
    latency = [(r.end or r.last) - r.start for r in records]
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    return {"requests": len(records), "tokens": sum(r.tokens for r in records),
            "streamed_ids": sum(r.ids for r in records), "wall_s": wall,
            "tokens_per_s": sum(r.tokens for r in records) / wall,
            "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "itl_ms_p50": ms(itl, 50),
            "itl_ms_p99": ms(itl, 99), "latency_ms_p50": ms(latency, 50), "latency_ms_p99": ms(latency, 99)}


async def closed_loop(one_request, concurrency: int, total: int, progress: Progress | None = None) -> dict:
    counter = iter(range(total))
    records: list[Recorder] = []

    async def client():
        for i in counter:
            records.append(await one_request(i))
            if progress:
                progress.tick(f"{len(records)}/{total} requests done")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(records, time.perf_counter() - started)


async def run_levels(one_request, levels: list[int], totals: dict[int, int], max_tokens: int, warmup_tokens: int,
                     progress: Progress, label: str) -> dict:
    """One warm-up request, then each level in turn, a progress line for each. `one_request(i, max_tokens)`."""
    progress.line(f"{label}: warm-up request ({min(warmup_tokens, max_tokens)} tokens)")
    await one_request(10_000, min(warmup_tokens, max_tokens))
    results = {}
    for c in levels:
        progress.begin(f"{label}, {c} client(s), {totals[c]} requests x {max_tokens} tokens")
        results[c] = await closed_loop(lambda i: one_request(i, max_tokens), c, totals[c], progress)
        progress.end(level_outcome(results[c]))
    return results


# ---- statistics over repetitions ----

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def aggregate(summaries: list[dict]) -> dict:
    """One level over the repetitions: each field's median (the fields of a single summary, so readers of one
    run's numbers read medians), with "range": {field: [min, max]} and "repetitions"."""
    out = {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}
    out["range"] = {key: [min(s[key] for s in summaries), max(s[key] for s in summaries)] for key in summaries[0]}
    out["repetitions"] = len(summaries)
    return out


def aggregate_ratios(per_repetition: list[dict]) -> tuple[dict, dict]:
    """(ratios: {name: median}, ratio_spread: {name: {median, min, max, values}}) over the repetitions that have
    each ratio."""
    names = list(dict.fromkeys(name for ratios in per_repetition for name in ratios))
    stats = {name: spread([ratios[name] for ratios in per_repetition if name in ratios]) for name in names}
    return {name: s["median"] for name, s in stats.items()}, stats


def with_range(median: float, low: float, high: float, digits: int = 0) -> str:
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def print_ratios(stats: dict) -> None:
    for name, s in stats.items():
        values = ", ".join(f"{v:.2f}" for v in s["values"])
        print(f"{name}: {s['median']:.2f} (range {s['min']:.2f}-{s['max']:.2f} over {len(s['values'])}: {values})")


# ---- through the server ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, port: int, log_path: Path, metrics_port: int | None = None) -> subprocess.Popen:
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", "chorus.cli", "serve", "--config", config, "--port", str(port),
                             "--metrics-port", str(metrics_port or free_port())],
                            stdout=log, stderr=subprocess.STDOUT)
    exited = lambda: f"server exited ({proc.returncode})" if proc.poll() is not None else None  # noqa: E731
    try:
        error = wait_until_serving(f"127.0.0.1:{port}", 600, exited)
    except BaseException:  # a SIGTERM (with_server) or Ctrl-C while it starts: no server is left behind
        stop_server(proc)
        raise
    if error:
        stop_server(proc)  # SIGINT first: chorus serve's ray.shutdown() runs, no Ray cluster is left behind
        raise RuntimeError(f"{error}; see {log_path}")
    return proc


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def with_server(config: str, log_path: Path, measure, progress: Progress | None = None):
    """Start a server on `config` (its output appended to `log_path`), return `measure("host:port")` and stop
    it; None (log tail printed) if it does not start. A SIGTERM to the benchmark stops the server first (its
    requests in flight then fail at once, so the benchmark's threads end) and then the benchmark; one that comes
    while the server is still starting stops it too."""
    port = free_port()
    begun = time.perf_counter()
    server = None

    def terminated(signum, frame):
        if server is not None:
            stop_server(server)
        sys.exit(128 + signum)  # while starting: start_server stops the server as this unwinds through it

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        if progress:
            progress.line(f"starting the server ({config}, log {log_path})")
        try:
            server = start_server(config, port, log_path)
        except RuntimeError as error:
            print(f"{error}\n--- server log tail ---\n{log_tail(log_path)}", file=sys.stderr)
            return None
        if progress:
            progress.line(f"server serving after {time.perf_counter() - begun:.0f} s")
        try:
            return measure(f"127.0.0.1:{port}")
        finally:
            stop_server(server)
    finally:
        signal.signal(signal.SIGTERM, previous)


async def run_server_levels(address: str, levels: list[int], totals: dict[int, int], max_tokens: int,
                            progress: Progress, label: str, strategy: dict | None = None,
                            warmup_tokens: int = WARMUP_TOKENS) -> dict:
    """`strategy`: GenerateRequest oneof fields, e.g. {"contrastive": pb.ContrastiveDecoding()}; None: plain."""
    import grpc

    from chorus.v1 import decoding_pb2 as pb
    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodingStub(channel)

        async def one_request(i: int, tokens: int) -> Recorder:
            request = pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content=prompt(i))],
                sampling=pb.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), **(strategy or {}))
            record = Recorder()
            async for message in stub.GenerateStream(request, timeout=600):
                record.tokens_arrived(len(message.token_ids))
                last = message
            return record.finished(last.usage.completion_tokens)

        return await run_levels(one_request, levels, totals, max_tokens, warmup_tokens, progress, label)


# ---- in-process ----

async def run_in_process_levels(config: str, levels: list[int], totals: dict[int, int], max_tokens: int,
                                progress: Progress, label: str) -> dict:
    from decoding.chat import ChatMessage
    from decoding.sampling import SamplingParams
    from server.app import make_engine
    from server.config import load_deploy_file
    from server.engines.base import GenerationRequest

    chorus = load_deploy_file(config).chorus
    group = next(iter(chorus.groups))
    begun = time.perf_counter()
    engine = make_engine(chorus, group)
    progress.line(f"{label}: engine built in {time.perf_counter() - begun:.0f} s")
    try:
        def request_for(i: int, tokens: int) -> GenerationRequest:
            return GenerationRequest(request_id=uuid.uuid4().hex, messages=(ChatMessage("user", prompt(i)),),
                                     sampling=SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))

        if chorus.models[chorus.groups[group].base].engine == "vllm":
            async def one_request(i: int, tokens: int) -> Recorder:  # straight on AsyncLLM, no Chorus code
                request = request_for(i, tokens)
                record = Recorder()
                async for output in engine._llm.generate({"prompt_token_ids": engine.prompt_ids(request)},
                                                         engine.sampling_params(request, seed=0),
                                                         request_id=request.request_id):
                    record.tokens_arrived(len(output.outputs[0].token_ids))  # output_kind=DELTA
                return record.finished(record.ids)
        else:
            async def one_request(i: int, tokens: int) -> Recorder:
                record = Recorder()
                async for chunk in engine.generate(request_for(i, tokens)):
                    record.tokens_arrived(len(chunk.token_ids))
                    last = chunk
                return record.finished(last.usage.completion_tokens)

        return await run_levels(one_request, levels, totals, max_tokens, WARMUP_TOKENS, progress, label)
    finally:
        engine.shutdown()


def in_process_repetition(config: str, levels: list[int], totals: dict[int, int], max_tokens: int, label: str,
                          started: float, done: int, total: int) -> dict:
    """Every level on a fresh in-process engine; run in a fresh (spawned) process, so the engine's torch thread is
    the process's only one and nothing of an earlier repetition lingers."""
    progress = Progress(total, started, done)
    return asyncio.run(run_in_process_levels(config, levels, totals, max_tokens, progress, label))


def in_fresh_process(function, *args):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ---- report ----

PANELS = [("tokens_per_s", "completion tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
          ("itl_ms_p50", "inter-token latency p50 (ms)"), ("itl_ms_p99", "inter-token latency p99 (ms)")]


def plot(results: dict, levels: list[int], path: Path, title: str, modes: tuple[str, ...] = ("server", "in_process"),
         panels: list[tuple[str, str]] = PANELS) -> None:
    """Medians over the repetitions, bars from min to max: a panel per (statistic, label), a line per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.75 * len(panels), 4.2))
    for ax, (key, label) in zip(axes, panels):
        for mode, marker in zip(modes, "os^v"):
            med = [results[mode][c][key] for c in levels]
            low = [m - results[mode][c]["range"][key][0] for m, c in zip(med, levels)]
            high = [results[mode][c]["range"][key][1] - m for m, c in zip(med, levels)]
            ax.errorbar(levels, med, yerr=[low, high], marker=marker, capsize=4, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_arguments(description: str, name: str, concurrency: list[int], max_tokens: int, requests: int,
                   add_more=lambda parser: None):
    """The arguments every benchmark here takes; returns (args, sorted levels, output folder, {level: requests})."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/local.yaml")
    parser.add_argument("--name", default=name, help="output file stem")
    parser.add_argument("--concurrency", "--levels", dest="concurrency", type=int, nargs="+", default=concurrency,
                        help="client levels")
    parser.add_argument("--max-tokens", "--tokens", dest="max_tokens", type=int, default=max_tokens,
                        help="completion tokens per request")
    parser.add_argument("--requests-per-level", "--requests", dest="requests", type=int, default=requests,
                        help="requests per level (at least 2 per client)")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="interleaved repetitions; ratios are their median and range (default 3)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="change one key of the deploy file's Chorus args for this run (repeatable; dotted KEY, "
                        "e.g. groups.smollm2.max_step_tokens=64; VALUE read as YAML); the changed file is written "
                        "beside the results as <name>-config.yaml")
    add_more(parser)
    args = parser.parse_args()
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.settings:
        try:
            args.config = str(config_with(args.config, args.settings, out / f"{args.name}-config.yaml"))
        except ValueError as error:
            parser.error(f"--set: {error}")
    levels = sorted(set(args.concurrency))
    return args, levels, out, {c: max(args.requests, 2 * c) for c in levels}


def config_with(config: str, settings: list[str], path: Path) -> Path:
    """`config` with each KEY=VALUE set in its Chorus args (the first application's), written to `path`. Unknown keys
    are left for the server's config check to refuse, as it does for any deploy file."""
    import yaml

    raw = yaml.safe_load(Path(config).read_text())
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"{setting!r}: expected KEY=VALUE")
        *parents, last = key.split(".")
        node = raw["applications"][0]["args"]
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part} is not a mapping in {config}")
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def machine_info(load_before) -> dict:
    import torch
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()}


def foundation_ratios(rep: dict, levels: list[int]) -> dict:
    server, in_process = rep["server"], rep["in_process"]
    ratios = {f"server_vs_in_process_throughput_at_{c}": server[c]["tokens_per_s"] / in_process[c]["tokens_per_s"]
              for c in reversed(levels)}
    low, high = levels[0], levels[-1]
    if high != low:
        ratios[f"server_throughput_{high}_vs_{low}"] = server[high]["tokens_per_s"] / server[low]["tokens_per_s"]
        ratios[f"in_process_throughput_{high}_vs_{low}"] = \
            in_process[high]["tokens_per_s"] / in_process[low]["tokens_per_s"]
    return ratios


def main() -> int:
    args, levels, out, totals = load_arguments(__doc__, "foundation", [1, 4, 16], 64, 8)
    reps = args.repetitions
    load_before = os.getloadavg()
    progress = Progress(total=reps * 2 * len(levels))
    log_path = out / f"{args.name}-server.log"
    log_path.write_text("")
    progress.line(f"{reps} repetition(s) of: server, then in-process, at {levels} client(s); "
                  f"requests per level {totals}, {args.max_tokens} tokens each")

    per_repetition = []
    for rep in range(reps):
        rep_started = time.time()
        tag = f"rep {rep + 1}/{reps}"
        server = with_server(args.config, log_path, lambda address: asyncio.run(run_server_levels(
            address, levels, totals, args.max_tokens, progress, f"{tag} server")), progress)
        if server is None:
            return 1
        progress.line(f"{tag} in-process: starting a fresh process")
        in_process = in_fresh_process(in_process_repetition, args.config, levels, totals, args.max_tokens,
                                      f"{tag} in-process", progress.started, progress.done, progress.total)
        progress.done += len(levels)
        per_repetition.append({"server": server, "in_process": in_process})
        progress.repetition_done(rep, reps, rep_started)

    results = {mode: {c: aggregate([r[mode][c] for r in per_repetition]) for c in levels}
               for mode in ("server", "in_process")}
    ratios, ratio_spread = aggregate_ratios([foundation_ratios(r, levels) for r in per_repetition])
    report = {"config": args.config, "max_tokens": args.max_tokens, "levels": levels, "requests_per_level": totals,
              "repetitions": reps, "order": "per repetition: server (fresh process), then in-process (fresh process)",
              "results": results, "ratios": ratios, "ratio_spread": ratio_spread,
              "per_repetition": per_repetition, "run_s": time.time() - progress.started,
              "machine": machine_info(load_before)}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(results, levels, out / f"{args.name}.png",
         f"{args.name}: {args.config}, {args.max_tokens} tokens/request, median and range of {reps} repetition(s)")

    print(f"medians [min-max] over {reps} repetition(s)")
    print(f"{'mode':<11} {'conc':>4} {'tok/s':>18} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>16} "
          f"{'ITL p99':>16} {'lat p50':>8} {'lat p99':>8}")
    for mode in results:
        for c in levels:
            r = results[mode][c]
            print(f"{mode:<11} {c:>4} {with_range(r['tokens_per_s'], *r['range']['tokens_per_s'], 1):>18} "
                  f"{r['ttft_ms_p50']:>9.0f} {r['ttft_ms_p99']:>9.0f} "
                  f"{with_range(r['itl_ms_p50'], *r['range']['itl_ms_p50']):>16} "
                  f"{with_range(r['itl_ms_p99'], *r['range']['itl_ms_p99']):>16} "
                  f"{r['latency_ms_p50']:>8.0f} {r['latency_ms_p99']:>8.0f}")
    print_ratios(ratio_spread)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')} in {clock(report['run_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
