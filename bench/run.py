"""Load benchmark: the same closed-loop load through the running server over gRPC and on the engine in-process.

    .venv/bin/python -m bench.run --config deploy/local.yaml [--concurrency 1 4 16] [--max-tokens 64]
        [--requests-per-level 8] [--out bench/results] [--name foundation]
    .venv/bin/python -m bench.run --config deploy/local-vllm.yaml --name vllm

For each concurrency level c, c clients send streaming chat requests back to back until max(2c,
--requests-per-level) requests are done, after one warm-up request. Every request is greedy with `ignore_eos` and a
fixed `max_tokens`, so each yields exactly that many tokens; prompts differ per request so no prefix is shared.
Per level: completion tokens/s (from each request's final `usage`) over the level's wall time, time to first token
(TTFT: first message with token ids), inter-token latency (ITL: gap between streamed messages / token ids in the
message), end-to-end request latency (until the stream ends), p50 and p99.

Modes, measured one after the other in one run (never competing for the cores):
  server      `chorus serve` in a separate process (Ray Serve + gRPC front end + engine), driven over gRPC;
  in_process  the same engine built from the same config inside this process, no Ray, no gRPC
              (for a vLLM model: AsyncLLM.generate called directly with the same SamplingParams).
Writes <out>/<name>.json and <out>/<name>.png; ratios are computed within the run. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from server.health import wait_until_serving

TOPICS = ["a lighthouse", "a lost key", "a robot gardener", "the moon", "a river", "a chess game", "a bakery",
          "a mountain", "a violin", "a storm", "a library", "a fox", "a train", "a desert", "a painter", "a comet"]


def prompt(i: int) -> str:
    return f"Tell me a short story about {TOPICS[i % len(TOPICS)]}, number {i}."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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


async def closed_loop(one_request, concurrency: int, total: int) -> dict:
    counter = iter(range(total))
    records: list[Recorder] = []

    async def client():
        for i in counter:
            records.append(await one_request(i))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(records, time.perf_counter() - started)


# ---- through the server ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", config, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    exited = lambda: f"server exited ({proc.returncode})" if proc.poll() is not None else None  # noqa: E731
    error = wait_until_serving(f"127.0.0.1:{port}", 600, exited)
    if error:
        stop_server(proc)  # SIGINT first: server.cli's ray.shutdown() runs, no Ray cluster is left behind
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


def with_server(config: str, log_path: Path, measure):
    """Start a server on `config`, return `measure("host:port")` and stop it; None (log tail printed) if it
    does not start."""
    port = free_port()
    try:
        server = start_server(config, port, log_path)
    except RuntimeError as error:
        print(f"{error}\n--- server log tail ---\n{log_tail(log_path)}", file=sys.stderr)
        return None
    try:
        return measure(f"127.0.0.1:{port}")
    finally:
        stop_server(server)


async def run_server_levels(address: str, levels: list[int], total_for, max_tokens: int,
                            strategy: dict | None = None) -> dict:
    """`strategy`: GenerateRequest oneof fields, e.g. {"contrastive": pb.ContrastiveDecoding()}; None: plain."""
    import grpc

    from chorus.v1 import decoding_pb2 as pb
    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodingStub(channel)

        async def one_request(i: int) -> Recorder:
            request = pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content=prompt(i))],
                sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), **(strategy or {}))
            record = Recorder()
            async for message in stub.GenerateStream(request, timeout=600):
                record.tokens_arrived(len(message.token_ids))
                last = message
            return record.finished(last.usage.completion_tokens)

        await one_request(10_000)  # warm-up
        return {c: await closed_loop(one_request, c, total_for(c)) for c in levels}


# ---- in-process ----

async def run_in_process_levels(config: str, levels: list[int], total_for, max_tokens: int) -> dict:
    from decoding.chat import ChatMessage
    from decoding.sampling import SamplingParams
    from server.app import make_engine
    from server.config import load_deploy_file
    from server.engines.base import GenerationRequest

    chorus = load_deploy_file(config).chorus
    group = next(iter(chorus.groups))
    engine = make_engine(chorus, group)
    try:
        def request_for(i: int) -> GenerationRequest:
            return GenerationRequest(request_id=uuid.uuid4().hex, messages=(ChatMessage("user", prompt(i)),),
                                     sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

        if chorus.models[chorus.groups[group].base].engine == "vllm":
            async def one_request(i: int) -> Recorder:  # straight on AsyncLLM, no Chorus code in the loop
                request = request_for(i)
                record = Recorder()
                async for output in engine._llm.generate({"prompt_token_ids": engine.prompt_ids(request)},
                                                         engine.sampling_params(request, seed=0),
                                                         request_id=request.request_id):
                    record.tokens_arrived(len(output.outputs[0].token_ids))  # output_kind=DELTA
                return record.finished(record.ids)
        else:
            async def one_request(i: int) -> Recorder:
                record = Recorder()
                async for chunk in engine.generate(request_for(i)):
                    record.tokens_arrived(len(chunk.token_ids))
                    last = chunk
                return record.finished(last.usage.completion_tokens)

        await one_request(10_000)  # warm-up
        return {c: await closed_loop(one_request, c, total_for(c)) for c in levels}
    finally:
        engine.shutdown()


# ---- report ----

def plot(results: dict, levels: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("tokens_per_s", "completion tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
              ("itl_ms_p50", "inter-token latency p50 (ms)")]
    for ax, (key, label) in zip(axes, panels):
        for mode, marker in (("server", "o"), ("in_process", "s")):
            ax.plot(levels, [results[mode][c][key] for c in levels], marker=marker, label=mode)
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
    """The arguments every benchmark here takes; returns (args, sorted levels, output folder, requests per level)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/local.yaml")
    parser.add_argument("--name", default=name, help="output file stem")
    parser.add_argument("--concurrency", type=int, nargs="+", default=concurrency)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--requests-per-level", "--requests", dest="requests", type=int, default=requests,
                        help="requests per level (at least 2 per client)")
    parser.add_argument("--out", default="bench/results")
    add_more(parser)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, sorted(args.concurrency), out, lambda c: max(args.requests, 2 * c)


def main() -> int:
    args, levels, out, total_for = load_arguments(__doc__, "foundation", [1, 4, 16], 64, 8)
    started = time.time()
    load_before = os.getloadavg()

    server_results = with_server(args.config, out / f"{args.name}-server.log",
                                 lambda address: asyncio.run(run_server_levels(address, levels, total_for,
                                                                               args.max_tokens)))
    if server_results is None:
        return 1
    in_process_results = asyncio.run(run_in_process_levels(args.config, levels, total_for, args.max_tokens))

    results = {"server": server_results, "in_process": in_process_results}
    low, high = levels[0], levels[-1]
    ratios = {
        f"server_vs_in_process_throughput_at_{high}":
            server_results[high]["tokens_per_s"] / in_process_results[high]["tokens_per_s"],
        f"server_throughput_{high}_vs_{low}":
            server_results[high]["tokens_per_s"] / server_results[low]["tokens_per_s"],
        f"in_process_throughput_{high}_vs_{low}":
            in_process_results[high]["tokens_per_s"] / in_process_results[low]["tokens_per_s"],
    }
    import torch
    report = {"config": args.config, "max_tokens": args.max_tokens, "levels": levels,
              "requests_per_level": {c: total_for(c) for c in levels}, "results": results,
              "ratios": ratios, "run_s": time.time() - started,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(results, levels, out / f"{args.name}.png", f"{args.name}: {args.config}, {args.max_tokens} tokens/request")

    print(f"{'mode':<11} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'lat p50':>8} {'lat p99':>8}")
    for mode in results:
        for c in levels:
            r = results[mode][c]
            print(f"{mode:<11} {c:>4} {r['tokens_per_s']:>8.1f} {r['ttft_ms_p50']:>9.0f} {r['ttft_ms_p99']:>9.0f} "
                  f"{r['itl_ms_p50']:>8.0f} {r['itl_ms_p99']:>8.0f} {r['latency_ms_p50']:>8.0f} "
                  f"{r['latency_ms_p99']:>8.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')} in {report['run_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
