"""Ragged rows in one padded forward against the split `padding_groups` chooses, on the lock-step runner.

    make bench-padding
    .venv/bin/python -m bench.padding [--model embedded:smollm2-135m-instruct] [--repetitions 4] [--name padding]

The transformers engine batches rows of different lengths: prefill chunks of newcomers, catch-ups of streams a plan
skipped (entropy switching) beside a stream's first activation (its whole prompt), and score/loglik jobs (FIRST
windows of concurrent queries). Padded into one forward, every row costs the longest; the runner now splits them
where the padding would cost more than another forward (server/lockstep/runner.py, `padding_groups`). Each case
runs on the same model both ways: a runner that never splits (`forward_overhead_tokens` = 10⁹, the behaviour before)
and the default one, each warmed up by one untimed call, then alternating which goes first, `--repetitions` times;
the logits of both ways must agree (to 1e-3) or the run stops. Writes <out>/<name>.json, .md and .png: median
[min–max] wall time per case each way and their ratio. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.run import ROOT, Progress, write_report

NEVER_SPLIT = 10 ** 9
# (name, what it stands for, tokens cached in each row's slot first, tokens each row adds, score rows: True =
# tail_log_probs)
CASES = [
    ("first activation beside catch-ups", "entropy switching: one stream's whole prompt (500 tokens, an empty slot) "
     "and eight streams 10 tokens behind (100 tokens cached each)", [0] + [100] * 8, [500] + [10] * 8, False),
    ("prefill chunks", "newcomers' chunks under a 256-token step budget, nothing cached", [0] * 4, [200, 30, 16, 10],
     False),
    ("FIRST windows", "four concurrent queries' windows of 20 passages scored together (1,700-2,040 tokens)",
     [0] * 4, [1700, 1850, 1950, 2040], True),
]


def timed_case(runner, cached: list[int], lengths: list[int], scores: bool):
    """Wall time of one batched call of the case on `runner`, and its logits."""
    import torch

    rows = [[(7 * i + j) % 30000 + 100 for j in range(n)] for i, n in enumerate(lengths)]
    if scores:
        began = time.perf_counter()
        logits = runner.tail_log_probs(rows, 1)[:, -1]
        return time.perf_counter() - began, logits
    slots = [runner.open() for _ in rows]
    try:
        with torch.inference_mode():
            for slot, count in zip(slots, cached):
                if count:
                    runner.extend(slot, [5] * count)
            began = time.perf_counter()
            logits = runner.extend_many(slots, rows)
            return time.perf_counter() - began, logits
    finally:
        for slot in slots:
            runner.close(slot)


def bench(args, progress: Progress) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from server.lockstep.runner import ModelRunner, padding_groups
    from server.models import resolve_model_path

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    longest = max(c + n for _, _, cached, lengths, _ in CASES for c, n in zip(cached, lengths))
    slots = max(len(lengths) for _, _, _, lengths, _ in CASES)
    runners = {way: ModelRunner(model, vocab_size=model.config.vocab_size, max_slots=slots, max_len=longest,
                                forward_overhead_tokens=overhead)
               for way, overhead in (("padded", NEVER_SPLIT), ("split", None))}
    overhead = runners["split"].forward_overhead_tokens  # the default for the model's device
    cases = []
    for name, stands_for, cached, lengths, scores in CASES:
        for runner in runners.values():  # one untimed call each first: the first call of a shape pays its set-up
            timed_case(runner, cached, lengths, scores)
        times = {"padded": [], "split": []}
        differ = 0.0
        for repetition in range(args.repetitions):
            ways = ("padded", "split") if repetition % 2 == 0 else ("split", "padded")
            logits = {}
            for way in ways:
                seconds, logits[way] = timed_case(runners[way], cached, lengths, scores)
                times[way].append(seconds)
            differ = max(differ, float((logits["padded"] - logits["split"]).abs().max()))
            if differ > 1e-3:
                raise SystemExit(f"{name}: the two ways' logits differ by {differ:.2e}")
            progress.tick(f"{name}, repetition {repetition + 1}/{args.repetitions}: padded "
                          f"{times['padded'][-1]:.2f} s, split {times['split'][-1]:.2f} s")
        cases.append({"case": name, "stands_for": stands_for, "cached_tokens": cached, "row_tokens": lengths,
                      "forwards_split": len(padding_groups(lengths, overhead)),
                      "padded_s": times["padded"], "split_s": times["split"], "max_diff": differ,
                      "ratio_split_over_padded":
                          statistics.median(times["split"]) / statistics.median(times["padded"])})
    return {"model": args.model, "threads": args.threads, "repetitions": args.repetitions,
            "forward_overhead_tokens": overhead, "cases": cases}


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def markdown(report: dict) -> str:
    lines = [f"Ragged rows, {report['model']} on the lock-step runner ({report['threads']} threads), "
             f"{report['repetitions']} alternating repetitions; wall time of one batched call, median [min–max] in "
             f"seconds; split = `padding_groups` with a forward counted as {report['forward_overhead_tokens']} "
             "tokens.", "",
             "| case | rows (tokens each) | forwards split | one padded forward (s) | split (s) | split / padded | "
             "max abs diff |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for case in report["cases"]:
        rows = ", ".join(str(n) for n in case["row_tokens"])
        lines.append(f"| {case['case']} | {rows} | {case['forwards_split']} | {_median_range(case['padded_s'])} | "
                     f"{_median_range(case['split_s'])} | **{case['ratio_split_over_padded']:.2f}×** | "
                     f"{case['max_diff']:.1e} |")
    lines += [""] + [f"- {case['case']}: {case['stands_for']}." for case in report["cases"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(cases))
    for offset, way, label in ((-0.2, "padded_s", "one padded forward"), (0.2, "split_s", "split (padding_groups)")):
        medians = [statistics.median(c[way]) for c in cases]
        errors = [[m - min(c[way]) for m, c in zip(medians, cases)], [max(c[way]) - m for m, c in zip(medians, cases)]]
        ax.bar([i + offset for i in x], medians, 0.4, yerr=errors, label=label)
    ax.set_xticks(list(x), [c["case"] for c in cases], fontsize=8)
    ax.set_ylabel("wall time of one batched call (s)")
    ax.set_title(f"Ragged rows, {report['model'].split(':')[-1]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="padding", help="the results' file name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--repetitions", type=int, default=4, help="an even number puts each way first equally often")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(1)
    progress.begin(f"{len(CASES)} cases on {args.model}")
    began = time.perf_counter()
    report = bench(args, progress)
    report["run_s"] = time.perf_counter() - began
    progress.end(", ".join(f"{c['case']} {c['ratio_split_over_padded']:.2f}×" for c in report["cases"]))
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
