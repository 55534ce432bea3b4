"""Best-of-N: a knockout round's judge calls batched against judged one at a time, and GSM8K accuracy of the
selection methods on the same candidates.

    .venv/bin/python -m bench.best_of_n [--config deploy/local.yaml] [--group G] [--candidates-group G] [--limit 50]
        [--n 4 8] [--tokens 256] [--judge-tokens 512] [--rows ...] [--speed-problems 4] [--name best-of-n] [--resume]
    make bench-best-of-n          # deploy/local.yaml, reduced (see the Makefile)

In process, on the group's engine (the transformers engine of the config), with the strategy layer's own code: the
candidates come from `sample_n` and the selections from server/strategies/best_of_n.py's judge and
decoding/best_of_n.py's bracket, exactly what a `best_of_n` request runs. Candidates are sampled once per problem
(max(--n) of them, seed = the problem's index, temperature 0.7) and every row selects among the first N of them:
with sample_n's seeds (candidate i draws with seed + i) those are the candidates an `n = N` request would get.
--candidates-group lets another group's base write the greedy replies and the candidates (on the Qwen pair:
`--group qwen --candidates-group qwen-small`, the 0.5B writes and the 1.5B judges, which a server request cannot
do: its judge runs on the request's own base); the engines run one after the other, never both at once.

Speed: for the first --speed-problems problems, round one of an N = max(--n) bracket (the pairs (0, 1), (2, 3),
...) with GENERATE verdicts, judged as one batch (the server's way: every call of a round issued at once) and one
call at a time, one problem after the other; the ratio of the two wall times, and whether the verdicts agree.

Accuracy (GSM8K, Cobbe et al. 2021, the quality benchmark's zero-shot prompt, exact match on the final number, 95%
Wilson interval) per row and N, with judge calls and wall time per problem (--concurrency problems in flight):
  greedy            plain greedy decoding by the model that writes the candidates (the same for every N)
  random            a uniformly random candidate (seeded)
  majority          the most common final answer (self-consistency; ties: the lowest index), no judge
  oracle            whether any candidate is correct (pass@N: the ceiling of every selection)
  pointwise         each candidate alone, the highest p(Correct)
  knockout-score    knockout, SCORE verdicts, one order; knockout-score-2 both orders
  knockout-gen      knockout, GENERATE verdicts (at most --judge-tokens per call), one order; knockout-gen-2 both
Writes <out>/<name>.json, .md and .png after every row, each row stamped with when it ran. The greedy replies and
the candidates are kept in <out>/best-of-n-candidates-<model>-<limit>x<tokens>.json, written after every chunk of
problems sampled (a stopped run loses at most one chunk) and read back by a later run with the same config, problems
and tokens; a later run wanting more candidates samples only the missing ones (candidate k draws with seed + k, so
they are those an N-candidate request gets). --resume keeps the rows (and the speed measurement) of an earlier
<out>/<name>.json measured with the same settings (config, both models, --limit, --tokens, --judge-tokens,
--concurrency; refused otherwise, naming the difference) and runs only the others, so a table too long for one
sitting is measured in parts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.quality import GSM8K_INSTRUCTION, gsm8k_problems, wilson
from bench.run import Progress, data_bench_parser, parse_data_bench_args, resumed, save_json, write_report
from decoding import best_of_n as bon
from decoding.chat import ChatMessage
from decoding.sampling import SamplingParams
from decoding.strategies import BestOfNParams

SELECTIONS = {  # row → the knobs of a best_of_n request
    "pointwise": BestOfNParams(selection="pointwise"),
    "knockout-score": BestOfNParams(verdict="score"),
    "knockout-score-2": BestOfNParams(verdict="score", both_orders=True),
    "knockout-gen": BestOfNParams(verdict="generate"),
    "knockout-gen-2": BestOfNParams(verdict="generate", both_orders=True),
}
ROWS = ("greedy", "random", "majority", "oracle", *SELECTIONS)


def problem_request(problem: dict, index: int, sampling: SamplingParams, strategy=None):
    from server.engines.base import GenerationRequest
    content = f"{GSM8K_INSTRUCTION}\n\n{problem['question']}"
    return GenerationRequest(request_id=f"p{index}", messages=(ChatMessage("user", content),), sampling=sampling,
                             strategy=strategy)


def is_correct(text: str, gold: float | None) -> bool:
    number = bon.final_number(text)
    return number is not None and gold is not None and abs(number - gold) < 1e-6


def majority(texts: list[str]) -> int:
    keys = [bon.answer_key(t, "math") for t in texts]
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return 0
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


async def select(engine, group, request, params: BestOfNParams, texts: list[str]) -> tuple[int, int]:
    """(winner, judge calls) of `params`' selection over the candidates `texts`, as the server's program runs it."""
    from server.strategies.best_of_n import Judge, Work, question_of

    work = Work()
    judge = Judge(engine, group, request, params, None, question_of(request), texts, work)
    if params.selection == "pointwise":
        scores = await asyncio.gather(*(judge.alone(i) for i in range(len(texts))))
        return bon.pointwise_winner(scores), len(texts)
    keys = [bon.answer_key(t, params.template) for t in texts]
    bracket = await bon.run_knockout(keys, judge.pairs, random.Random(int(request.request_id[1:])),
                                     params.both_orders)
    return bracket.winner, bracket.judge_calls


async def speed(engine, group, problems, candidates, judge_tokens: int, progress: Progress) -> dict:
    from server.strategies.best_of_n import Judge, Work, question_of

    params = BestOfNParams(verdict="generate", template="math", judge_max_tokens=judge_tokens)
    batched_s = one_s = 0.0
    agree = total = 0
    for index, problem in enumerate(problems):
        texts = candidates[index]
        request = problem_request(problem, index, SamplingParams())
        pairs = [(i, i + 1) for i in range(0, len(texts) - 1, 2)]
        judge = Judge(engine, group, request, params, None, question_of(request), texts, Work())
        started = time.perf_counter()
        together = await judge.pairs(pairs)
        batched_s += time.perf_counter() - started
        started = time.perf_counter()
        alone = [(await judge.pairs([pair]))[0] for pair in pairs]
        one_s += time.perf_counter() - started
        agree += sum(a == b for a, b in zip(together, alone))
        total += len(pairs)
        progress.tick(f"problem {index + 1}/{len(problems)}: batched {batched_s:.0f} s, one at a time {one_s:.0f} s")
    return {"problems": len(problems), "n": len(candidates[0]), "pairs_per_round": len(pairs), "batched_s": batched_s,
            "one_at_a_time_s": one_s, "speedup": one_s / batched_s, "verdicts_equal": agree / total}


def candidates_cache(out: Path, config: str, model: str, limit: int, tokens: int) -> tuple[Path, dict]:
    """The file of the greedy replies and candidates of `model` on the first `limit` problems, and its key."""
    return (out / f"best-of-n-candidates-{model}-{limit}x{tokens}.json",
            {"config": config, "model": model, "limit": limit, "tokens": tokens})


async def sample(engine, cache: Path, key: dict, problems: list[dict], n: int, batch: int,
                 progress: Progress) -> dict:
    """The greedy reply and `n` candidates (temperature 0.7, seed = the problem's index) of every problem, read from
    `cache` as far as an earlier run of the same key got, the rest sampled in chunks (greedy: `batch` problems at a
    time; candidates: enough problems to fill two batches) and `cache` written after each chunk, so a stopped run
    loses at most one chunk. A file of fewer candidates is extended: sample_n draws candidate k with seed + k, so
    candidates k.. of a problem are those of a request with seed + k, and the extended list is what an n-candidate
    request gets. A file of more candidates goes on with as many."""
    sampled = json.loads(cache.read_text()) if cache.exists() else None
    if sampled is None or sampled["key"] != key:
        sampled = {"key": key, "n": n, "greedy": [], "greedy_s": 0.0, "candidates": [], "candidates_s": 0.0}
    elif sampled["n"] < n:
        progress.line(f"{cache} holds {sampled['n']} candidates a problem; sampling the other {n - sampled['n']}")
        sampled["n"] = n
    n, tokens = sampled["n"], key["tokens"]
    missing = [i for i in range(len(problems))
               if i >= len(sampled["candidates"]) or len(sampled["candidates"][i]) < n]
    if len(sampled["greedy"]) == len(problems) and not missing:
        progress.line(f"greedy replies and candidates from {cache} (sampled in an earlier run)")
    elif sampled["greedy"] or sampled["candidates"]:
        progress.line(f"{len(sampled['greedy'])} greedy replies and {len(problems) - len(missing)} problems' "
                      f"candidates from {cache} (an earlier run); sampling the rest")
    while len(sampled["greedy"]) < len(problems):
        first = len(sampled["greedy"])
        started = time.perf_counter()
        sampled["greedy"] += await asyncio.gather(*(
            _text(engine, problem_request(problems[i], i, SamplingParams(max_tokens=tokens, temperature=0)))
            for i in range(first, min(first + batch, len(problems)))))
        sampled["greedy_s"] += time.perf_counter() - started
        save_json(cache, sampled)
        progress.tick(f"greedy {len(sampled['greedy'])}/{len(problems)}")
    chunk = max(1, 2 * batch // n)
    for first in range(0, len(missing), chunk):
        indices = missing[first:first + chunk]
        have = [len(sampled["candidates"][i]) if i < len(sampled["candidates"]) else 0 for i in indices]
        started = time.perf_counter()
        drawn = await asyncio.gather(*(
            engine.sample_n(problem_request(problems[i], i, SamplingParams(max_tokens=tokens, temperature=0.7,
                                                                           seed=i + k)), n - k)
            for i, k in zip(indices, have)))
        for i, cands in zip(indices, drawn):
            if i < len(sampled["candidates"]):
                sampled["candidates"][i] += [c.text for c in cands]
            else:
                sampled["candidates"].append([c.text for c in cands])
        sampled["candidates_s"] += time.perf_counter() - started
        save_json(cache, sampled)
        progress.tick(f"candidates {first + len(indices)}/{len(missing)} problems")
    return sampled


async def bench(args, chorus, judging: str, writing: str, points: list[tuple[str, int]], progress: Progress,
                report: dict, write) -> None:
    """Measures the (row, N) `points` (those a --resume run's `report` lacks) with group `judging` as the judge and
    group `writing`'s base writing greedy replies and candidates, calling `write(report)` after each."""
    from server.app import make_engine

    group = chorus.groups[judging]
    group = dataclasses.replace(group, best_of_n=dataclasses.replace(group.best_of_n,
                                                                     judge_max_tokens=args.judge_tokens))
    writer = chorus.groups[writing]
    problems = gsm8k_problems(args.data, args.limit)
    n_max = max(args.n)
    cache, key = candidates_cache(args.out, args.config, writer.base, len(problems), args.tokens)
    progress.begin(f"greedy and {n_max} candidates for {len(problems)} problems ({writer.base})")
    engine = make_engine(chorus, writer.name)
    try:
        sampled = await sample(engine, cache, key, problems, n_max, writer.max_batch_size, progress)
    except BaseException:
        engine.shutdown()
        raise
    progress.end(f"{sampled['greedy_s']:.0f} s greedy, {sampled['candidates_s']:.0f} s candidates")
    report["greedy_s"], report["candidates_s"] = sampled["greedy_s"], sampled["candidates_s"]
    greedy = sampled["greedy"]
    candidates = [cands[:n_max] for cands in sampled["candidates"]]
    if writer.name != group.name:
        engine.shutdown()
        engine = make_engine(chorus, group.name)
    try:
        if args.speed_problems:
            progress.begin(f"speed: round one of {n_max}, {args.speed_problems} problems")
            report["speed"] = await speed(engine, group, problems[:args.speed_problems], candidates,
                                          args.judge_tokens, progress)
            progress.end(f"{report['speed']['speedup']:.2f}x")
            write(report)
        golds = [p["gold"] for p in problems]
        in_flight = asyncio.Semaphore(args.concurrency)

        async def bounded(selection):
            async with in_flight:
                return await selection

        for row, n in points:
            progress.begin(f"{row}, N = {n}")
            started = time.perf_counter()
            texts = [cands[:n] for cands in candidates]
            calls = [0] * len(problems)
            if row == "greedy":
                picked = greedy
            elif row == "random":
                picked = [t[random.Random(i).randrange(n)] for i, t in enumerate(texts)]
            elif row == "majority":
                picked = [t[majority(t)] for t in texts]
            elif row == "oracle":
                picked = [next((x for x in t if is_correct(x, g)), t[0]) for t, g in zip(texts, golds)]
            else:
                params = dataclasses.replace(SELECTIONS[row], n=n, judge_max_tokens=args.judge_tokens)
                results = await asyncio.gather(*(
                    bounded(select(engine, group, problem_request(p, i, SamplingParams()), params, texts[i]))
                    for i, p in enumerate(problems)))
                picked = [texts[i][w] for i, (w, _) in enumerate(results)]
                calls = [c for _, c in results]
            wall = time.perf_counter() - started
            correct = sum(is_correct(t, g) for t, g in zip(picked, golds))
            low, high = wilson(correct, len(problems))
            report["rows"].append({"row": row, "n": n, "accuracy": correct / len(problems), "ci95": [low, high],
                                   "judge_calls_per_problem": sum(calls) / len(problems),
                                   "wall_s_per_problem": wall / len(problems), "wall_s": wall,
                                   "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
            report["rows"].sort(key=lambda r: (ROWS.index(r["row"]), r["n"]))
            write(report)
            progress.end(f"accuracy {correct}/{len(problems)}, {sum(calls) / len(problems):.1f} calls/problem")
    finally:
        engine.shutdown()


def row_points(rows: list[str], ns: list[int]) -> list[tuple[str, int]]:
    """(row, N) in the order they run; greedy has no candidates (N = 1)."""
    return [(row, n) for row in rows for n in ([1] if row == "greedy" else ns)]


async def _text(engine, request) -> str:
    return "".join([c.text async for c in engine.generate(request)])


def markdown(report: dict) -> str:
    writes = (f"{report['candidates_model']} writes the candidates, {report['model']} judges"
              if report["candidates_model"] != report["model"] else f"{report['model']} writes the candidates and judges")
    lines = [f"Best-of-N, {report['config']} ({writes}): GSM8K n = {report['limit']}, candidates at temperature 0.7 "
             f"and at most {report['tokens']} tokens, judge at most {report['judge_tokens']} tokens per GENERATE "
             f"call; greedy {report['greedy_s']:.0f} s, candidates {report['candidates_s']:.0f} s for all problems; "
             f"run {report['run_s'] / 60:.0f} min.", ""]
    speed = report.get("speed")
    if speed:
        lines += [f"Round one of an N = {speed['n']} bracket ({speed['pairs_per_round']} GENERATE judge calls), "
                  f"{speed['problems']} problems one after the other: batched {speed['batched_s']:.0f} s, one call "
                  f"at a time {speed['one_at_a_time_s']:.0f} s: **{speed['speedup']:.2f}×** (verdicts equal in "
                  f"{speed['verdicts_equal']:.0%} of the calls).", ""]
    lines += [f"| row | N | GSM8K accuracy [95% CI] | judge calls / problem | wall s / problem "
              f"({report['concurrency']} in flight) | measured |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['n']} | {r['accuracy']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                     f"{r['judge_calls_per_problem']:.1f} | {r['wall_s_per_problem']:.2f} | {r['measured']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r["row"] for r in report["rows"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    width = 0.8 / len(report["n"])
    for k, n in enumerate(report["n"]):
        values = [next((r["accuracy"] for r in report["rows"] if r["row"] == row and r["n"] in (n, 1)), 0)
                  for row in rows]
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=f"N = {n}")
    ax.set_xticks([i + width * (len(report["n"]) - 1) / 2 for i in range(len(rows))], rows, rotation=30, ha="right")
    ax.set_ylabel("GSM8K accuracy")
    ax.legend()
    writer = "" if report["candidates_model"] == report["model"] else f"{report['candidates_model']} writes, "
    ax.set_title(f"best-of-N selection, {report['limit']} problems\n{writer}{report['model']} judges", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = data_bench_parser(__doc__.splitlines()[0], "deploy/local.yaml", "best-of-n", "gsm8k/test_shared.jsonl")
    parser.add_argument("--group", help="the model group (default: the default model's)")
    parser.add_argument("--limit", type=int, default=50, help="GSM8K problems")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="candidates per selection")
    parser.add_argument("--tokens", type=int, default=256, help="max tokens per candidate")
    parser.add_argument("--judge-tokens", dest="judge_tokens", type=int, default=512,
                        help="max tokens per GENERATE judge call")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--concurrency", type=int, default=16,
                        help="problems selected at once (their judge calls wait in the engine's queue, which refuses "
                             "work beyond the group's max_waiting)")
    parser.add_argument("--speed-problems", dest="speed_problems", type=int, default=4,
                        help="problems for the batched-vs-one-at-a-time round (0: skip)")
    parser.add_argument("--candidates-group", dest="candidates_group",
                        help="the group whose base writes the greedy replies and candidates (default: --group's); "
                             "the judge is always --group's")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an earlier <out>/<name>.json with the same settings, run the others")
    args = parse_data_bench_args(parser)
    from server.config import load_deploy_file

    chorus = load_deploy_file(args.config).chorus
    for name in (args.group, args.candidates_group):
        if name is not None and name not in chorus.groups:
            parser.error(f"no group {name!r} in {args.config}; its groups: {sorted(chorus.groups)}")
    judging = args.group or next(n for n, g in chorus.groups.items() if g.base == chorus.default_model)
    writing = args.candidates_group or judging
    settings = {"config": args.config, "model": chorus.groups[judging].base,
                "candidates_model": chorus.groups[writing].base,
                "limit": len(gsm8k_problems(args.data, args.limit)), "tokens": args.tokens,
                "judge_tokens": args.judge_tokens, "concurrency": args.concurrency}
    path = args.out / f"{args.name}.json"
    report = settings | {"n": sorted(set(args.n)), "rows": [], "run_s": 0.0}
    if args.resume and path.exists():
        earlier = json.loads(path.read_text())
        report |= {"rows": resumed(path, settings, "rows"), "run_s": earlier["run_s"],
                   "n": sorted(set(args.n) | set(earlier["n"]))}
        if "speed" in earlier:
            report["speed"] = earlier["speed"]
            args.speed_problems = 0
    points = [p for p in row_points(args.rows, args.n)
              if not any(r["row"] == p[0] and r["n"] == p[1] for r in report["rows"])]
    progress = Progress(1 + bool(args.speed_problems) + len(points))
    started = time.perf_counter()
    command = "python -m bench.best_of_n " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in vars(args).items() if k not in ("data", "out") and v is not None and v is not False)

    def write(report: dict) -> None:
        write_report(args.out, args.name, report | {"run_s": report["run_s"] + time.perf_counter() - started,
                                                    "command": command}, markdown, plot)

    asyncio.run(bench(args, chorus, judging, writing, points, progress, report, write))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
