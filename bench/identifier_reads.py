"""FIRST's identifier reads on a tokenizer that merges "[A" (Qwen2.5): one `score_along` of prompt + "[" (the
merged identifiers after the prompt, "O" and "Q" after "[", one forward) against the two `score` calls it replaced
(the prompt, and the prompt + "["), on the same engine in the same run.

    make bench-identifier-reads
    .venv/bin/python -m bench.identifier_reads [--model embedded:qwen2.5-coder-0.5b-instruct] [--windows 6]
        [--max-model-len 4096] [--name identifier-reads]

Each window is the first one (BM25 ranks 1-20) of a TREC DL20 query (../shared/data/dl20), its passages cut to fit
the context as a Rerank call cuts them, read by the transformers engine both ways, the two ways alternating which
goes first; the log-probabilities of both ways must agree (to 1e-4) or the run stops. Writes <out>/<name>.json, .md
and .png: wall time per window each way and the ratio of their sums. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench.rerank import load_dl20
from bench.run import ROOT, Progress, parse_data_bench_args, write_report


async def bench(args, progress: Progress) -> dict:
    from decoding import rerank as rr
    from decoding.sampling import SamplingParams
    from server.config import GroupSpec, ModelSpec
    from server.engines.base import GenerationRequest
    from server.engines.transformers_engine import TransformersEngine
    from server.strategies.rerank import Reranker

    group = GroupSpec("g", "ranker", max_batch_size=2)
    engine = TransformersEngine(ModelSpec("ranker", args.model, max_model_len=args.max_model_len), group)
    try:
        reranker = Reranker(engine, group)
        if reranker.unavailable:
            raise SystemExit(reranker.unavailable)
        spellings = reranker.identifiers.spellings[:20]
        [(continuation, positions)] = rr.identifier_reads(spellings)
        if not (continuation and positions[0]):
            raise SystemExit(f"{args.model}'s tokenizer spells every identifier alike: nothing to compare")
        windows = []
        runs, _ = load_dl20(args.data / "dl20")
        for i, run in enumerate(runs[:args.windows]):
            params = rr.RerankParams(query=run["query"], passages=tuple(h["content"] for h in run["hits"][:20])
                                     ).validate()
            text, words = reranker.window_prompt(params, list(range(20)))
            request = GenerationRequest(f"w{i}", SamplingParams(max_tokens=1, temperature=0.0), prompt=text)
            bracket_text = engine.tokenizer.decode(list(continuation))

            async def two_scores():
                return await asyncio.gather(engine.score(request, positions[0]), engine.score(
                    GenerationRequest(f"w{i}b", request.sampling, prompt=text + bracket_text), positions[1]))

            async def one_read():
                return await engine.score_along(request, continuation, positions)

            timed = {}
            for way in (("two", "one") if i % 2 == 0 else ("one", "two")):
                began = time.perf_counter()
                timed[way] = (await (two_scores() if way == "two" else one_read()), time.perf_counter() - began)
            (two, two_s), (one, one_s) = timed["two"], timed["one"]
            differ = max(abs(a - b) for x, y in zip(two, one) for a, b in zip(x, y))
            if differ > 1e-4:
                raise SystemExit(f"window {i}: the two ways differ by {differ:.2e}")
            windows.append({"query": run["query"], "prompt_tokens": len(engine.tokenizer.encode(text)),
                            "passage_words": words, "two_scores_s": two_s, "one_read_s": one_s, "max_diff": differ})
            progress.tick(f"window {i + 1}/{args.windows}: two scores {two_s:.1f} s, one read {one_s:.1f} s")
    finally:
        engine.shutdown()
    two_total, one_total = sum(w["two_scores_s"] for w in windows), sum(w["one_read_s"] for w in windows)
    return {"model": args.model, "max_model_len": args.max_model_len, "windows": windows,
            "two_scores_s": two_total, "one_read_s": one_total, "ratio_one_over_two": one_total / two_total,
            "median_prompt_tokens": statistics.median(w["prompt_tokens"] for w in windows)}


def markdown(report: dict) -> str:
    lines = [f"Identifier reads, {report['model']} (transformers engine, context {report['max_model_len']}): "
             f"{len(report['windows'])} FIRST windows of 20 DL20 passages (median prompt "
             f"{report['median_prompt_tokens']:.0f} tokens); one `score_along` forward takes "
             f"**{report['ratio_one_over_two']:.2f}×** the wall time of the two `score` calls it replaced "
             f"({report['one_read_s']:.1f} s vs {report['two_scores_s']:.1f} s in all).", "",
             "| window | prompt tokens | two scores (s) | one read (s) | max abs diff |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {i} | {w['prompt_tokens']} | {w['two_scores_s']:.2f} | {w['one_read_s']:.2f} | {w['max_diff']:.1e} |"
              for i, w in enumerate(report["windows"])]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(windows))
    ax.bar([i - 0.2 for i in x], [w["two_scores_s"] for w in windows], 0.4, label="two score calls")
    ax.bar([i + 0.2 for i in x], [w["one_read_s"] for w in windows], 0.4, label="one score_along")
    ax.set_xlabel("window (DL20 query)")
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"FIRST identifier reads, {report['model'].split(':')[-1]}: "
                 f"{report['ratio_one_over_two']:.2f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the data folder (dl20/)")
    parser.add_argument("--name", default="identifier-reads", help="the results' file name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--max-model-len", dest="max_model_len", type=int, default=4096)
    args = parse_data_bench_args(parser)
    progress = Progress(1)
    progress.begin(f"{args.windows} windows on {args.model}")
    report = asyncio.run(bench(args, progress))
    progress.end(f"one read / two scores = {report['ratio_one_over_two']:.2f}")
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
