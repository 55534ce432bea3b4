"""Best-of-N: a knockout round's judge calls batched against judged one at a time, and GSM8K accuracy of the
selection methods on the same candidates.

    .venv/bin/python -m bench.best_of_n [--config deploy/local.yaml] [--limit 50] [--n 4 8] [--tokens 256]
        [--judge-tokens 512] [--rows ...] [--speed-problems 4] [--name best-of-n]
    make bench-best-of-n          # deploy/local.yaml, then a smaller run on deploy/local-pair.yaml (see the Makefile)

In process, on the group's engine (the transformers engine of the config), with the strategy layer's own code: the
candidates come from `sample_n` and the selections from server/strategies/best_of_n.py's judge and
decoding/best_of_n.py's bracket, exactly what a `best_of_n` request runs. Candidates are sampled once per problem
(max(--n) of them, seed = the problem's index, temperature 0.7) and every row selects among the first N of them:
with sample_n's seeds (candidate i draws with seed + i) those are the candidates an `n = N` request would get.

Speed: for the first --speed-problems problems, round one of an N = max(--n) bracket (the pairs (0, 1), (2, 3),
...) with GENERATE verdicts, judged as one batch (the server's way: every call of a round issued at once) and one
call at a time, one problem after the other; the ratio of the two wall times, and whether the verdicts agree.

Accuracy (GSM8K, Cobbe et al. 2021, the quality benchmark's zero-shot prompt, exact match on the final number, 95%
Wilson interval) per row and N, with judge calls and wall time per problem (--concurrency problems in flight):
  greedy            plain greedy decoding (no candidates; the same for every N)
  random            a uniformly random candidate (seeded)
  majority          the most common final answer (self-consistency; ties: the lowest index), no judge
  oracle            whether any candidate is correct (pass@N: the ceiling of every selection)
  pointwise         each candidate alone, the highest p(Correct)
  knockout-score    knockout, SCORE verdicts, one order; knockout-score-2 both orders
  knockout-gen      knockout, GENERATE verdicts (at most --judge-tokens per call), one order; knockout-gen-2 both
Writes <out>/<name>.json, .md and .png. The greedy replies and the candidates are kept in
<out>/best-of-n-candidates-<model>-<limit>x<tokens>.json and read back by a later run with the same config, problems
and tokens and at most as many candidates, so rows can be measured in several runs (each run's report holds the rows
it measured, and the candidates' sampling time of the run that sampled them).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
from pathlib import Path

from bench.quality import GSM8K_INSTRUCTION, gsm8k_problems, wilson
from bench.run import Progress, data_bench_parser, parse_data_bench_args, write_report
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
        texts = [c.text for c in candidates[index]]
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
    return {"problems": len(problems), "pairs_per_round": len(pairs), "batched_s": batched_s,
            "one_at_a_time_s": one_s, "speedup": one_s / batched_s, "verdicts_equal": agree / total}


async def bench(args, progress: Progress) -> dict:
    from server.app import make_engine
    from server.config import load_deploy_file

    chorus = load_deploy_file(args.config).chorus
    group_name = args.group or next(n for n, g in chorus.groups.items() if g.base == chorus.default_model)
    group = chorus.groups[group_name]
    group = dataclasses.replace(group, best_of_n=dataclasses.replace(group.best_of_n,
                                                                     judge_max_tokens=args.judge_tokens))
    engine = make_engine(chorus, group_name)
    problems = gsm8k_problems(args.data, args.limit)
    n_max = max(args.n)
    report = {"config": args.config, "model": group.base, "limit": len(problems), "n": args.n,
              "tokens": args.tokens, "judge_tokens": args.judge_tokens, "concurrency": args.concurrency, "rows": []}
    try:
        cache = args.out / f"best-of-n-candidates-{group.base}-{len(problems)}x{args.tokens}.json"
        key = {"config": args.config, "model": group.base, "limit": len(problems), "tokens": args.tokens}
        cached = json.loads(cache.read_text()) if cache.exists() else None
        if cached is not None and cached["key"] == key and cached["n"] >= n_max:
            greedy = cached["greedy"]
            candidates = [[Candidate(t) for t in c[:n_max]] for c in cached["candidates"]]
            report["greedy_s"], report["candidates_s"] = cached["greedy_s"], cached["candidates_s"]
            progress.done += 1  # the sampling step, done by an earlier run
            progress.line(f"greedy replies and candidates from {cache} (sampled in an earlier run)")
        else:
            progress.begin(f"greedy and {n_max} candidates for {len(problems)} problems")
            started = time.perf_counter()
            greedy = await asyncio.gather(*(
                _text(engine, problem_request(p, i, SamplingParams(max_tokens=args.tokens, temperature=0)))
                for i, p in enumerate(problems)))
            report["greedy_s"] = time.perf_counter() - started
            started = time.perf_counter()
            candidates = await asyncio.gather(*(
                engine.sample_n(problem_request(p, i, SamplingParams(max_tokens=args.tokens, temperature=0.7,
                                                                     seed=i)), n_max)
                for i, p in enumerate(problems)))
            report["candidates_s"] = time.perf_counter() - started
            cache.write_text(json.dumps({"key": key, "n": n_max, "greedy": greedy, "greedy_s": report["greedy_s"],
                                         "candidates_s": report["candidates_s"],
                                         "candidates": [[c.text for c in cands] for cands in candidates]}))
            progress.end(f"{report['greedy_s']:.0f} s greedy, {report['candidates_s']:.0f} s candidates")
        if args.speed_problems:
            progress.begin(f"speed: round one of {n_max}, {args.speed_problems} problems")
            report["speed"] = await speed(engine, group, problems[:args.speed_problems], candidates,
                                          args.judge_tokens, progress)
            progress.end(f"{report['speed']['speedup']:.2f}x")
        golds = [p["gold"] for p in problems]
        in_flight = asyncio.Semaphore(args.concurrency)

        async def bounded(selection):
            async with in_flight:
                return await selection

        for row in args.rows:
            for n in (args.n if row != "greedy" else [n_max]):
                progress.begin(f"{row}, N = {n}")
                started = time.perf_counter()
                texts = [[c.text for c in cands[:n]] for cands in candidates]
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
                report["rows"].append({"row": row, "n": n if row != "greedy" else 1, "accuracy": correct / len(problems),
                                       "ci95": [low, high], "judge_calls_per_problem": sum(calls) / len(problems),
                                       "wall_s_per_problem": wall / len(problems)})
                progress.end(f"accuracy {correct}/{len(problems)}, {sum(calls) / len(problems):.1f} calls/problem")
    finally:
        engine.shutdown()
    return report


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A candidate read back from the cache of an earlier run (the sampled chunk's text is all the rows use)."""
    text: str


async def _text(engine, request) -> str:
    return "".join([c.text async for c in engine.generate(request)])


def markdown(report: dict) -> str:
    lines = [f"Best-of-N, {report['config']} ({report['model']} writes the candidates and judges): GSM8K n = "
             f"{report['limit']}, candidates at temperature 0.7 and at most {report['tokens']} tokens, judge at most "
             f"{report['judge_tokens']} tokens per GENERATE call; greedy {report['greedy_s']:.0f} s, candidates "
             f"{report['candidates_s']:.0f} s for all problems; run {report['run_s'] / 60:.0f} min.", ""]
    speed = report.get("speed")
    if speed:
        lines += [f"Round one of an N = {max(report['n'])} bracket ({speed['pairs_per_round']} GENERATE judge calls), "
                  f"{speed['problems']} problems one after the other: batched {speed['batched_s']:.0f} s, one call "
                  f"at a time {speed['one_at_a_time_s']:.0f} s: **{speed['speedup']:.2f}×** (verdicts equal in "
                  f"{speed['verdicts_equal']:.0%} of the calls).", ""]
    lines += [f"| row | N | GSM8K accuracy [95% CI] | judge calls / problem | wall s / problem "
              f"({report['concurrency']} in flight) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['n']} | {r['accuracy']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                     f"{r['judge_calls_per_problem']:.1f} | {r['wall_s_per_problem']:.2f} |")
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
    ax.set_title(f"best-of-N selection: {report['model']}, {report['limit']} problems")
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
    args = parse_data_bench_args(parser)
    steps = 1 + bool(args.speed_problems) + sum(len(args.n) if r != "greedy" else 1 for r in args.rows)
    progress = Progress(steps)
    started = time.perf_counter()
    report = asyncio.run(bench(args, progress))
    report["run_s"] = time.perf_counter() - started
    report["command"] = "python -m bench.best_of_n " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("data", "out"))
    write_report(args.out, args.name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
