"""Entropy-adaptive model switching: the large model's share of the tokens against speed and quality, through the
running server, a threshold sweep beside large-only and small-only decoding of the same requests.

    .venv/bin/python -m bench.entropy_switch [--config deploy/local.yaml] [--limit 50] [--tokens 128]
        [--scales 0.5 0.75 1 1.5 2] [--thresholds ...] [--concurrency 16] [--no-loglik] [--name entropy-switch]
        [--resume]
    make bench-entropy-switch          # deploy/local.yaml, then deploy/local-pair.yaml (smaller: see the Makefile)

Requests: the first --limit GSM8K problems (Cobbe et al. 2021) with the quality benchmark's zero-shot prompt
(bench/quality.py), greedy, at most --tokens tokens, --concurrency in flight so the server batches them. Points,
each the same requests, one after the other on one server:
  large-only   entropy_switch with start large, threshold −inf, min_span 0: the base alone (the baseline; the same
               tokens as plain decoding, with the strategy's report)
  small-only   threshold +inf: the small guide alone
  τ = s × τ₀   for each --scales s, τ₀ the group's calibrated `entropy_threshold` (or --thresholds in bits), window
               5 and min_span 10 (the defaults)
Per point: wall time and completion tokens/s, the speed-up over large-only (tokens/s ratio, same requests and
concurrency, minutes apart), the large model's share of the tokens (from the reports), switches per request, the
parameter-weighted compute saved, GSM8K accuracy (exact match on the final number, 95% Wilson interval), agreement
with large-only greedy (the share of each reply's tokens equal to large-only's before their first difference, and
exact matches), and, unless --no-loglik, the large model's mean log-likelihood per token of the produced text
(teacher-forced, in this process after the server has stopped). Writes <out>/<name>.json, .md and .png.

Every point's replies go to <out>/<name>-replies.json as soon as the point is measured, with the run's settings.
--resume keeps the points there measured with the same settings (config, group, --limit, --tokens, --concurrency;
refused otherwise, naming the difference) and runs only the others, so a sweep too long for one sitting is measured
in parts; each point says when it was measured, and a speed-up then compares points of different sittings.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.quality import GSM8K_INSTRUCTION, final_number, gsm8k_problems, run_requests, wilson
from bench.run import (Progress, data_bench_parser, parse_data_bench_args, resumed, save_json, with_server,
                       write_report)
from decoding.entropy_switch import compute_saved


def points(scales: list[float], thresholds: list[float], default: float | None) -> list[dict]:
    """[{name, knobs}] in the order they run: large-only, the sweep, small-only."""
    if not thresholds:
        if default is None:
            raise SystemExit("the group has no entropy_threshold: give --thresholds")
        thresholds = [s * default for s in scales]
    sweep = [{"name": f"tau={t:.3g}", "threshold": t, "knobs": {"threshold": t}} for t in thresholds]
    return ([{"name": "large-only", "threshold": -math.inf,
              "knobs": {"threshold": -math.inf, "min_span": 0, "start": "START_LARGE"}}] + sweep
            + [{"name": "small-only", "threshold": math.inf, "knobs": {"threshold": math.inf}}])


def run_point(stub, point: dict, model: str, problems: list[dict], tokens: int, concurrency: int,
              progress: Progress) -> dict:
    from chorus.v1 import decoding_pb2 as pb

    knobs = dict(point["knobs"])
    if "start" in knobs:
        knobs["start"] = getattr(pb.EntropySwitch, knobs["start"])
    requests = [pb.GenerateRequest(model=model, messages=[pb.ChatMessage(
        role="user", content=f"{GSM8K_INSTRUCTION}\n\n{p['question']}")], sampling=pb.SamplingParams(
        temperature=0, max_tokens=tokens), entropy_switch=pb.EntropySwitch(**knobs)) for p in problems]
    started = time.perf_counter()
    responses = run_requests(stub, requests, concurrency, progress)
    wall = time.perf_counter() - started
    failed = [str(r.details()) for r in responses if not hasattr(r, "text")]
    if failed:
        raise RuntimeError(f"{point['name']}: {len(failed)} requests failed: {failed[:2]}")
    reports = [r.report.entropy_switch for r in responses]
    completion = sum(r.usage.completion_tokens for r in responses)
    large_fraction = sum(r.large_tokens for r in reports) / completion
    correct = [final_number(r.text) is not None and p["gold"] is not None
               and abs(final_number(r.text) - p["gold"]) < 1e-6 for r, p in zip(responses, problems)]
    low, high = wilson(sum(correct), len(correct))
    return {"point": point["name"], "threshold": point["threshold"], "wall_s": wall, "completion_tokens": completion,
            "tokens_per_s": completion / wall, "large_fraction": large_fraction,
            "switches_per_request": statistics.mean(r.switches for r in reports),
            "compute_saved": compute_saved(large_fraction, reports[0].parameter_ratio),
            "parameter_ratio": reports[0].parameter_ratio, "accuracy": sum(correct) / len(correct),
            "ci95": [low, high], "n": len(correct),
            "prompts": [p["question"] for p in problems], "token_ids": [list(r.token_ids) for r in responses]}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(mean share of each reference reply's tokens before the first difference, share of exact matches)."""
    shares, exact = [], 0
    for mine, theirs in zip(tokens, reference):
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        shares.append(same / max(1, len(theirs)))
        exact += mine == theirs
    return statistics.mean(shares), exact / len(reference)


@functools.cache
def _large_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def large_loglik(path: str, prompts: list[str], replies: list[list[int]]) -> float:
    """The model at `path`'s mean log-likelihood per token of `replies` after the chat prompts (teacher-forced)."""
    import torch

    tokenizer, model = _large_model(path)
    total, count = 0.0, 0
    for question, reply in zip(prompts, replies):
        if not reply:
            continue
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{question}"}],
                                             add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + reply])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        log_probs = torch.log_softmax(logits, -1).gather(1, torch.tensor(reply)[:, None])
        total, count = total + float(log_probs.sum()), count + len(reply)
    return total / count


def markdown(report: dict) -> str:
    lines = [f"Entropy switching, {report['config']} (small: {report['small']}, P_S/P_L = "
             f"{report['parameter_ratio']:.2f}): GSM8K n = {report['limit']} (greedy, at most {report['tokens']} "
             f"tokens), {report['concurrency']} in flight; the points' wall time {report['run_s'] / 60:.0f} min.",
             "",
             "| point | threshold (bits) | large fraction | speed-up vs large-only | tok/s | compute saved | "
             "GSM8K accuracy [95% CI] | agreement with large-only (prefix share / exact) | large model's "
             "log-lik./token | switches/request | measured |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["points"]:
        loglik = f"{r['large_loglik']:.3f}" if r.get("large_loglik") is not None else "–"
        lines.append(f"| {r['point']} | {r['threshold']:.3g} | {r['large_fraction']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['tokens_per_s']:.1f} | {r['compute_saved']:.2f} | {r['accuracy']:.2f} "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['agreement_prefix']:.2f} / "
                     f"{r['agreement_exact']:.2f} | {loglik} | {r['switches_per_request']:.1f} | "
                     f"{r.get('measured', '–')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["points"], key=lambda r: r["large_fraction"])
    x = [r["large_fraction"] for r in rows]
    panels = [("speedup", "speed-up over large-only (tok/s)"), ("accuracy", "GSM8K accuracy"),
              ("agreement_prefix", "agreement with large-only (prefix share)")]
    if all(r.get("large_loglik") is not None for r in rows):
        panels.append(("large_loglik", "large model's log-likelihood / token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(x, [r[key] for r in rows], "o-")
        for r, xi in zip(rows, x):
            ax.annotate(r["point"], (xi, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("large model's share of tokens")
        ax.set_ylabel(label)
    fig.suptitle(f"entropy switching: {report['config']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = data_bench_parser(__doc__.splitlines()[0], "deploy/local.yaml", "entropy-switch",
                               "gsm8k/test_shared.jsonl")
    parser.add_argument("--group", help="the model group (default: the default model's)")
    parser.add_argument("--limit", type=int, default=50, help="GSM8K problems per point")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens per reply")
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 0.75, 1.0, 1.5, 2.0],
                        help="thresholds as multiples of the group's entropy_threshold")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[], help="thresholds in bits (override)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-loglik", dest="loglik", action="store_false",
                        help="skip the large model's log-likelihood of the outputs (a forward per reply)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the points of an earlier <out>/<name>-replies.json with the same settings, "
                             "run the others")
    args = parse_data_bench_args(parser)

    from server.config import load_deploy_file

    chorus = load_deploy_file(args.config).chorus
    group = chorus.groups[args.group] if args.group else next(
        g for g in chorus.groups.values() if g.base == chorus.default_model)
    sweep = points(args.scales, args.thresholds, group.entropy_threshold)
    problems = gsm8k_problems(args.data, args.limit)
    settings = {"config": args.config, "group": group.name, "limit": args.limit, "tokens": args.tokens,
                "concurrency": args.concurrency}
    replies_path = args.out / f"{args.name}-replies.json"
    names = [p["name"] for p in sweep]
    earlier = resumed(replies_path, settings, "points") if args.resume else []
    results = [r for r in earlier if r["point"] in names]
    elsewhere = [r for r in earlier if r["point"] not in names]  # points of another sweep: kept in the file
    to_run = [p for p in sweep if p["name"] not in {r["point"] for r in results}]
    progress = Progress(len(to_run) + (1 if args.loglik else 0))

    def measure(address: str) -> list[dict]:
        import grpc

        from chorus.v1 import decoding_pb2_grpc

        stub = decoding_pb2_grpc.DecodingStub(grpc.insecure_channel(address))
        for point in to_run:
            progress.begin(f"{point['name']} ({len(problems)} problems)")
            measured = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            result = run_point(stub, point, group.base, problems, args.tokens, args.concurrency, progress)
            progress.end(f"large fraction {result['large_fraction']:.2f}, {result['tokens_per_s']:.1f} tok/s, "
                         f"accuracy {result['accuracy']:.2f}")
            results.append(result | {"measured": measured})
            # Every measured point, replies included, as soon as it is in: a stopped run (or a failure of the
            # log-likelihood pass) loses nothing, and --resume goes on from here.
            save_json(replies_path, settings | {"points": elsewhere + results})
        return results

    if to_run and with_server(args.config, args.out / f"{args.name}-server.log", measure, progress) is None:
        return 1
    results.sort(key=lambda r: names.index(r["point"]))
    baseline = results[0]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / baseline["tokens_per_s"]
        r["agreement_prefix"], r["agreement_exact"] = agreement(r["token_ids"], baseline["token_ids"])
    if args.loglik:
        progress.begin("the large model's log-likelihood of every point's replies (in-process)")
        from server.models import resolve_model_path

        path = resolve_model_path(chorus.models[group.base].path)
        for r in results:
            r["large_loglik"] = large_loglik(path, r["prompts"], r["token_ids"])
        progress.end("done")
    report = settings | {"small": next((g.name for g in group.guides.values() if "small" in g.roles), ""),
                         "parameter_ratio": baseline["parameter_ratio"], "run_s": sum(r["wall_s"] for r in results),
                         "points": [{k: v for k, v in r.items() if k not in ("prompts", "token_ids")}
                                    for r in results]}
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
