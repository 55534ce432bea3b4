"""Listwise reranking: MODE_FIRST_TOKEN against MODE_GENERATE on TREC DL20 (nDCG@10 and latency), and queries per
second at 1 and 8 queries in flight.

    .venv/bin/python -m bench.rerank [--config deploy/local.yaml] [--queries 54] [--generate-queries 10]
        [--throughput-queries 8] [--window-size 20] [--stride 10] [--name rerank] [--resume]
    make bench-rerank

In process on the group's engine (the transformers engine of the config) with the strategy layer's own program
(server/strategies/rerank.py's Reranker: what a Rerank call runs), on the BM25 top-100 of the TREC 2020 Deep
Learning passage track (54 judged queries; ../shared/data/dl20), the request defaults (windows of 20 moving by 10:
9 windows a query; passages cut to 300 words and further until a window fits the context).

  quality     nDCG@10 (trec_eval's ndcg_cut_10: gain = the judged grade, discount log2(rank + 1), the ideal
              order from every judged passage of the query) of the BM25 order, of MODE_FIRST_TOKEN over the first
              --queries queries, and of MODE_GENERATE over the first --generate-queries (a subset: it writes ~60
              tokens a window); BM25 and FIRST are also given on that subset.
  latency     each query alone (one in flight), wall time per query and per window, both modes on the
              --generate-queries subset: the ratio FIRST / GENERATE of the summed wall times.
  throughput  MODE_FIRST_TOKEN queries per second over the first --throughput-queries queries, one in flight and
              8 in flight (windows of different queries share the engine's forwards); 0 skips it.
Writes <out>/<name>.json, .md and .png. Timings are never asserted.

Each query run one at a time is logged as it finishes to <out>/<name>.queries.jsonl (ranking, wall time, windows).
A run too long for one sitting (the 1.5B: about 9 minutes a query first token, 12 generating, on 2 cores) goes on
with --resume: the queries logged under the same settings are kept as measured and only the others run. The
8-in-flight run is one measurement and is never resumed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import statistics
import time
from pathlib import Path

from bench.run import Progress, data_bench_parser, parse_data_bench_args, write_report
from decoding.rerank import RerankParams

DEPTH = 10


def load_dl20(folder: Path) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """The BM25 runs (query, hits in BM25 order) and the qrels (qid → docid → grade)."""
    runs = json.loads((folder / "retrieve_results_dl20.json").read_text())
    qrels: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for line in (folder / "qrels.dl20-passage.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        qrels[qid][docid] = int(grade)
    return runs, qrels


def ndcg_at(ranked_docids: list[str], judged: dict[str, int], depth: int = DEPTH) -> float:
    """trec_eval's ndcg_cut: Σ grade / log2(rank + 1) over the first `depth`, over the same for the ideal order."""
    dcg = sum(judged.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranked_docids[:depth]))
    ideal = sorted(judged.values(), reverse=True)[:depth]
    best = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / best if best > 0 else 0.0


def query_params(run: dict, mode: str, args) -> RerankParams:
    return RerankParams(query=run["query"], passages=tuple(h["content"] for h in run["hits"]), mode=mode,
                        window_size=args.window_size, stride=args.stride).validate()


def docids(run: dict, ranking: list[int]) -> list[str]:
    return [run["hits"][i]["docid"] for i in ranking]


WINDOW_FIELDS = ("latency_ms", "prompt_tokens", "completion_tokens", "forward_passes", "passage_words")


def qid(run: dict) -> str:
    return str(run["hits"][0]["qid"])


class QueryLog:
    """The queries run one at a time, one JSON line each in `path` as they finish; with `resume`, the lines of an
    earlier run are read back (SystemExit if they were measured under other settings), else the file starts empty."""

    def __init__(self, path: Path, settings: dict, resume: bool):
        self.path, self.settings = path, settings
        self.kept: dict[tuple[str, str], dict] = {}
        if resume and path.exists():
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines) - 1:  # the line a stopped run was writing: that query runs again
                        break
                    raise
                if entry["settings"] != settings:
                    raise SystemExit(f"--resume: {path} holds queries measured under {entry['settings']}, not "
                                     f"{settings}; pass the same settings, or another --name")
                self.kept[(entry["mode"], entry["qid"])] = entry
        else:
            path.write_text("")

    def get(self, mode: str, query: str) -> dict | None:
        return self.kept.get((mode, query))

    def add(self, mode: str, query: str, result: dict) -> None:
        entry = {"settings": self.settings, "mode": mode, "qid": query} | result
        with self.path.open("a") as log:
            log.write(json.dumps(entry) + "\n")
        self.kept[(mode, query)] = entry


async def rerank_queries(reranker, runs: list[dict], mode: str, args, in_flight: int, progress: Progress,
                         log: QueryLog | None = None) -> dict:
    """Every query reranked, `in_flight` at a time: rankings, per-query wall times, windows and tokens. With a
    `log`, queries it already holds are taken from it and the others are added to it as they finish."""
    from server.strategies.rerank import RerankJob

    gate = asyncio.Semaphore(in_flight)
    done = resumed = 0

    async def one(i: int, run: dict) -> dict:
        nonlocal done, resumed
        kept = log.get(mode, qid(run)) if log else None
        if kept is not None:
            resumed += 1
            done += 1
            return kept
        async with gate:
            started = time.perf_counter()
            outcome = await reranker.run(RerankJob(f"{mode}-{i}", query_params(run, mode, args)))
            took = time.perf_counter() - started
        result = {"ranking": outcome.ranking, "query_s": took,
                  "windows": [{f: getattr(w, f) for f in WINDOW_FIELDS} for w in outcome.windows]}
        if log:
            log.add(mode, qid(run), result)
        done += 1
        progress.tick(f"{mode}: {done}/{len(runs)} queries")
        return result

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i, run) for i, run in enumerate(runs)))
    wall = time.perf_counter() - started
    windows = [w for result in results for w in result["windows"]]
    return {"rankings": [r["ranking"] for r in results], "query_s": [r["query_s"] for r in results],
            "resumed_queries": resumed, "wall_s": wall, "queries_per_s": len(runs) / wall, "windows": len(windows),
            "window_ms_median": statistics.median(w["latency_ms"] for w in windows),
            "prompt_tokens_per_window": statistics.mean(w["prompt_tokens"] for w in windows),
            "completion_tokens_per_window": statistics.mean(w["completion_tokens"] for w in windows),
            "forward_passes": sum(w["forward_passes"] for w in windows),
            "passage_words_min": min(w["passage_words"] for w in windows)}


async def bench(args, progress: Progress) -> dict:
    from server.app import make_engine
    from server.config import load_deploy_file
    from server.strategies.rerank import Reranker

    chorus = load_deploy_file(args.config).chorus
    group_name = args.group or next(n for n, g in chorus.groups.items() if g.base == chorus.default_reranker)
    group = chorus.groups[group_name]
    runs, qrels = load_dl20(args.data / "dl20")
    engine = make_engine(chorus, group_name)
    report = {"config": args.config, "model": group.base, "max_model_len": engine.max_model_len,
              "window_size": args.window_size, "stride": args.stride, "queries": args.queries,
              "generate_queries": args.generate_queries, "throughput_queries": args.throughput_queries}
    settings = {key: report[key] for key in ("config", "model", "max_model_len", "window_size", "stride")}
    try:
        log = QueryLog(args.out / f"{args.name}.queries.jsonl", settings, args.resume)
        reranker = Reranker(engine, group)
        if reranker.unavailable:
            raise SystemExit(reranker.unavailable)

        def ndcg(rankings, subset):
            return statistics.mean(ndcg_at(docids(run, r), qrels[qid(run)]) for run, r in zip(subset, rankings))

        first_runs = runs[:args.queries]
        generate_runs = runs[:args.generate_queries]
        bm25 = [list(range(len(run["hits"]))) for run in runs]
        progress.begin(f"MODE_FIRST_TOKEN, {len(first_runs)} queries one at a time")
        first = await rerank_queries(reranker, first_runs, "first_token", args, 1, progress, log)
        progress.end(f"{sum(first['query_s']):.0f} s ({first['resumed_queries']} queries resumed)")
        progress.begin(f"MODE_GENERATE, {len(generate_runs)} queries one at a time")
        generate = await rerank_queries(reranker, generate_runs, "generate", args, 1, progress, log)
        progress.end(f"{sum(generate['query_s']):.0f} s ({generate['resumed_queries']} queries resumed)")
        if args.throughput_queries:
            throughput = {"1": args.throughput_queries / sum(first["query_s"][:args.throughput_queries])}
            progress.begin(f"MODE_FIRST_TOKEN, {args.throughput_queries} queries, 8 in flight")
            eight = await rerank_queries(reranker, runs[:args.throughput_queries], "first_token", args, 8, progress)
            throughput["8"] = eight["queries_per_s"]
            progress.end(f"{eight['queries_per_s']:.3f} queries/s")
            report["throughput_queries_per_s"], report["eight_in_flight"] = throughput, eight
        sub = len(generate_runs)
        report["quality"] = [
            {"row": "BM25", "queries": len(first_runs), "ndcg10": ndcg(bm25, first_runs)},
            {"row": "FIRST (first token)", "queries": len(first_runs), "ndcg10": ndcg(first["rankings"], first_runs)},
        ]
        if sub < len(first_runs):  # the two orders again on the queries both modes ran
            report["quality"] += [
                {"row": "BM25", "queries": sub, "ndcg10": ndcg(bm25, generate_runs)},
                {"row": "FIRST (first token)", "queries": sub, "ndcg10": ndcg(first["rankings"][:sub], generate_runs)},
            ]
        report["quality"].append(
            {"row": "generate permutation", "queries": sub, "ndcg10": ndcg(generate["rankings"], generate_runs)})
        first_sub, generate_all = sum(first["query_s"][:sub]), sum(generate["query_s"])
        report["latency"] = {
            "queries": sub, "first_s_per_query": first_sub / sub, "generate_s_per_query": generate_all / sub,
            "ratio": first_sub / generate_all, "first_window_ms_median": first["window_ms_median"],
            "generate_window_ms_median": generate["window_ms_median"],
            "first_prompt_tokens_per_window": first["prompt_tokens_per_window"],
            "generate_prompt_tokens_per_window": generate["prompt_tokens_per_window"],
            "generate_completion_tokens_per_window": generate["completion_tokens_per_window"],
            "first_forward_passes_per_query": first["forward_passes"] / len(first_runs),
            "generate_forward_passes_per_query": generate["forward_passes"] / sub,
            "passage_words_min": min(first["passage_words_min"], generate["passage_words_min"])}
        report["first"], report["generate"] = first, generate
    finally:
        engine.shutdown()
    return report


def markdown(report: dict) -> str:
    lat, qps = report["latency"], report.get("throughput_queries_per_s")
    lines = [f"Listwise reranking, {report['config']} ({report['model']}, context {report['max_model_len']}): TREC "
             f"DL20 BM25 top-100, windows of {report['window_size']} moving by {report['stride']}; run "
             f"{report['run_s'] / 60:.0f} min.", "",
             "| row | queries | nDCG@10 |", "| --- | ---: | ---: |"]
    lines += [f"| {r['row']} | {r['queries']} | {r['ndcg10']:.4f} |" for r in report["quality"]]
    lines += ["", f"Latency, one query at a time, the same {lat['queries']} queries: first token "
              f"{lat['first_s_per_query']:.1f} s a query ({lat['first_forward_passes_per_query']:.0f} forwards, "
              f"median window {lat['first_window_ms_median']:.0f} ms, {lat['first_prompt_tokens_per_window']:.0f} "
              f"prompt tokens), generate {lat['generate_s_per_query']:.1f} s a query "
              f"({lat['generate_completion_tokens_per_window']:.0f} tokens written a window, median window "
              f"{lat['generate_window_ms_median']:.0f} ms): **{lat['ratio']:.2f}×** (target ≤ 0.5×). Passages were "
              f"cut to as few as {lat['passage_words_min']} words to fit."]
    resumed = report["first"]["resumed_queries"] + report["generate"]["resumed_queries"]
    if resumed:
        lines += ["", f"{resumed} of the {report['queries'] + report['generate_queries']} query runs were measured by "
                  f"an earlier sitting of this run (--resume)."]
    if qps:
        lines += ["", f"Throughput, first token, {report['throughput_queries']} queries: {qps['1']:.3f} queries/s "
                  f"one at a time, {qps['8']:.3f} with 8 in flight (**{qps['8'] / qps['1']:.2f}×**)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = report["quality"]
    short = {"FIRST (first token)": "first token", "generate permutation": "generate"}
    left.bar([f"{short.get(r['row'], r['row'])}\n({r['queries']} q)" for r in rows], [r["ndcg10"] for r in rows],
             color=[{"BM25": "grey", "generate permutation": "tab:orange"}.get(r["row"], "tab:blue") for r in rows])
    left.set_ylabel("nDCG@10")
    left.set_title(f"TREC DL20, {report['model']}")
    left.tick_params(axis="x", labelsize=7)
    lat = report["latency"]
    right.bar(["first token", "generate"], [lat["first_s_per_query"], lat["generate_s_per_query"]],
              color=["tab:blue", "tab:orange"])
    right.set_ylabel("seconds per query (one at a time)")
    right.set_title(f"latency ratio {lat['ratio']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = data_bench_parser(__doc__.splitlines()[0], "deploy/local.yaml", "rerank", "dl20/")
    parser.add_argument("--group", help="the model group (default: the default reranker's)")
    parser.add_argument("--queries", type=int, default=54, help="DL20 queries reranked with MODE_FIRST_TOKEN")
    parser.add_argument("--generate-queries", dest="generate_queries", type=int, default=10,
                        help="of those, the first N also reranked with MODE_GENERATE (latency and quality)")
    parser.add_argument("--throughput-queries", dest="throughput_queries", type=int, default=8,
                        help="queries of the 8-in-flight throughput run (0: no throughput run)")
    parser.add_argument("--window-size", dest="window_size", type=int, default=RerankParams.window_size)
    parser.add_argument("--stride", type=int, default=RerankParams.stride)
    parser.add_argument("--resume", action="store_true",
                        help="keep the queries of <out>/<name>.queries.jsonl measured under the same settings")
    args = parse_data_bench_args(parser)
    if not 1 <= args.generate_queries <= args.queries or not 0 <= args.throughput_queries <= args.queries:
        parser.error("--generate-queries must be in [1, --queries], --throughput-queries in [0, --queries]")
    progress = Progress(3 if args.throughput_queries else 2)
    started = time.perf_counter()
    report = asyncio.run(bench(args, progress))
    report["run_s"] = time.perf_counter() - started
    report["command"] = "python -m bench.rerank " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("data", "out", "resume") and v is not None)
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
