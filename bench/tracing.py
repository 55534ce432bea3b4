"""What tracing costs: the same closed-loop load through the real server with `tracing:` off and on (every request
sampled, spans sent to an OTLP/gRPC collector in this process), repetitions interleaved (off, on, off, on, ...).

Reports completion tokens/s and latency p50 per client level for both, and the ratios traced / untraced (median and
range over the repetitions), plus how many spans the collector received per request.

  .venv/bin/python -m bench.tracing            # `make bench-tracing`; --help for the knobs
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.otlp_collector import GrpcReceiver
from bench.run import (Progress, aggregate, aggregate_ratios, clock, load_arguments, machine_info, plot, print_ratios,
                       run_server_levels, with_server, with_range)

MODES = ("untraced", "traced")


def traced_config(config: str, endpoint: str, folder: Path) -> str:
    raw = yaml.safe_load(Path(config).read_text())
    raw["applications"][0]["args"]["tracing"] = {"endpoint": endpoint, "sample_ratio": 1.0}
    path = folder / "traced.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def ratios(rep: dict, levels: list[int]) -> dict:
    out = {}
    for c in levels:
        off, on = rep["untraced"][c], rep["traced"][c]
        out[f"throughput_traced_vs_untraced_at_{c}"] = on["tokens_per_s"] / off["tokens_per_s"]
        out[f"latency_p50_traced_vs_untraced_at_{c}"] = on["latency_ms_p50"] / off["latency_ms_p50"]
    return out


def main() -> int:
    args, levels, out, totals = load_arguments(__doc__, "tracing", [1, 8], 32, 8)
    reps = args.repetitions
    load_before = os.getloadavg()
    collector = GrpcReceiver()
    folder = tempfile.TemporaryDirectory()
    traced = traced_config(args.config, collector.endpoint, Path(folder.name))
    log_path = out / f"{args.name}-server.log"
    log_path.write_text("")
    progress = Progress(total=reps * 2 * len(levels))
    progress.line(f"{reps} repetition(s) of: untraced, then traced, at {levels} client(s); requests per level "
                  f"{totals}, {args.max_tokens} tokens each; collector at {collector.endpoint}")
    per_repetition, spans_per_request = [], []
    for rep in range(reps):
        started = time.time()
        tag = f"rep {rep + 1}/{reps}"
        measured = {}
        for mode, config in zip(MODES, (args.config, traced)):
            before = len(collector.spans())
            result = with_server(config, log_path, lambda address: asyncio.run(run_server_levels(
                address, levels, totals, args.max_tokens, progress, f"{tag} {mode}")), progress)
            if result is None:
                return 1
            measured[mode] = result
            if mode == "traced":  # the server stopped: its replicas sent what they buffered
                requests = sum(totals.values()) + 1  # and the warm-up request
                spans_per_request.append((len(collector.spans()) - before) / requests)
        per_repetition.append(measured)
        progress.repetition_done(rep, reps, started)
    collector.stop()
    folder.cleanup()

    results = {mode: {c: aggregate([r[mode][c] for r in per_repetition]) for c in levels} for mode in MODES}
    medians, spread = aggregate_ratios([ratios(r, levels) for r in per_repetition])
    report = {"config": args.config, "max_tokens": args.max_tokens, "levels": levels, "requests_per_level": totals,
              "repetitions": reps, "order": "per repetition: untraced server, then traced server (fresh each)",
              "spans_per_request": spans_per_request, "results": results, "ratios": medians,
              "ratio_spread": spread, "per_repetition": per_repetition, "run_s": time.time() - progress.started,
              "machine": machine_info(load_before)}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(results, levels, out / f"{args.name}.png",
         f"{args.name}: {args.config}, {args.max_tokens} tokens/request, median and range of {reps} repetition(s)",
         modes=MODES, panels=[("tokens_per_s", "completion tokens/s"), ("latency_ms_p50", "request latency p50 (ms)")])
    for mode in MODES:
        for c in levels:
            r = results[mode][c]
            print(f"{mode:<9} {c:>3} clients: {with_range(r['tokens_per_s'], *r['range']['tokens_per_s'], 1)} tok/s,"
                  f" latency p50 {r['latency_ms_p50']:.0f} ms")
    print(f"spans per request: {spans_per_request}")
    print_ratios(spread)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')} in {clock(report['run_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
