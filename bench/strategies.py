"""Token-level strategies: tokens/s and time per step through the running server against plain decoding of the
base, against the strategies' own forward times (the physical floor) and against a naive research-style
implementation, all in one run, --repetitions times interleaved.

    .venv/bin/python -m bench.strategies [--config deploy/local.yaml] [--name strategies] [--max-tokens 48]
        [--repetitions 3]
    .venv/bin/python -m bench.strategies --config deploy/local-vllm.yaml --name strategies-vllm --no-naive
    .venv/bin/python -m bench.strategies --repetitions 1 --levels 1 2 --requests 2 --max-tokens 6 \\
        --naive-tokens 6 --name smoke

A repetition:
  1. Chorus: a fresh `chorus serve` process, driven over gRPC by closed-loop clients (bench/run.py) at each level
     (1 and 8 clients), greedy, `ignore_eos`, fixed max_tokens: plain decoding first, then every strategy (in the
     listed order on odd repetitions, reversed on even ones, so no strategy is always the furthest from plain);
     the server is stopped.
  2. Here, with the server gone (transformers configs): the engine in-process in a fresh process, plain and CD one
     request at a time; each model's own decode forward at the batch sizes the strategies step at each level (the
     floor); the naive implementation of each strategy (unless --no-naive).
Every ratio is taken within a repetition and reported as the median and the range (min-max) over repetitions.

Forward floor: a strategy's request steps one row per stream on each model it uses (the base on the prompt, plus
its plan's streams: the amateur, the base on a lame/negative context, in-context experts; a stream reusing the
base's logits costs no row) in one batched forward per model. At c clients the engine admits
min(c, max_batch_size // rows) requests per model at once, so a step is, at the least, one decode forward of each
model at admitted × its rows. An early-exit amateur on the base's prompt is read from the base's forward: it takes
no slot and costs its model's head (final norm and output projection) at admitted rows, "MODEL (head)". Each is
timed here on the engine's ModelRunner (slot KV cache, the engine's torch thread count, chat prompts at about the
requests' mid-generation length; median of --floor-steps forwards) and summed: time per step (inter-token latency
p50 through the server) / floor. Skipped on a vLLM base (its base forward is vLLM's, not timed here).

Naive: what the papers' reference scripts do — one request at a time, transformers `generate` with the base model's
KV cache, and a LogitsProcessor that recomputes every other stream (amateur, lame/negative context, experts) from
scratch on its whole context at every step, then applies the same fusion math (decoding/plans.py). Its throughput
does not depend on concurrency (requests are served one after another).

Writes <out>/<name>.json and .png. Timings are never asserted anywhere.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.run import (Progress, aggregate, aggregate_ratios, in_fresh_process, load_arguments, machine_info,
                       print_ratios, prompt, run_server_levels, spread, with_range, with_server)


def strategies() -> dict:
    from chorus.v1 import decoding_pb2 as pb

    negative = pb.Context(prompt="A cat sat on the mat. The sky is blue. Apples are red.")
    lame = pb.Context(messages=[pb.ChatMessage(role="user", content="Tell me a short story.")])
    return {
        "plain": {},
        "cd": {"contrastive": pb.ContrastiveDecoding()},
        "uscd": {"contrastive": pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD, contrast_context=lame)},
        "steer": {"contrastive": pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_STEER, guide="exit8",
                                                        contrast_context=negative)},
        "fusion_dynamic": {"logit_fusion": pb.LogitFusion()},
        "fusion_static": {"logit_fusion": pb.LogitFusion(mode=pb.LogitFusion.MODE_STATIC)},
        "refusal": {"refusal_steering": pb.RefusalSteering()},
    }


def generate_request(fields: dict, i: int, max_tokens: int):
    from chorus.v1 import decoding_pb2 as pb

    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt(i))],
                              sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                              **fields)


HEAD = " (head)"  # a model's head alone: an early-exit stream read from the base's forward


class LocalModels:
    """The group's models on transformers, loaded once in this process: their forward times (the floor) and the
    naive research-style implementation of each strategy."""

    def __init__(self, config_path: str):
        import torch

        from server.config import load_deploy_file
        from server.engines.prompts import load_tokenizer
        from server.lockstep.guides import ModelLoader, early_exits_of
        from server.models import resolve_model_path
        from server.strategies.registry import PlanResolver

        config = load_deploy_file(config_path).chorus
        self.group = next(iter(config.groups.values()))
        torch.set_num_threads(self.group.torch_threads or os.cpu_count())  # as the engine's thread
        loader = ModelLoader(config.models)
        self.models = {name: loader.load(name) for name in {self.group.base, *self.group.guide_models}}
        self.exits = early_exits_of(config.models, self.group.base, self.group.guide_models)
        self.tokenizer = load_tokenizer(resolve_model_path(config.models[self.group.base].path))
        self.resolver = PlanResolver(self.group, self.tokenizer, 2048, config.models)
        self.vocab = len(self.tokenizer)

    def _resolve(self, fields: dict, i: int, max_tokens: int):
        from server.engines.prompts import render_prompt
        from server.service import to_generation_request

        domain = to_generation_request(generate_request(fields, i, max_tokens), f"local-{i}", None)
        ids = render_prompt(self.tokenizer, domain)
        return ids, self.resolver.resolve(domain, ids)

    def rows(self, fields: dict) -> dict[str, int]:
        """Rows a request of this strategy steps on each model per decode step: its base stream and each of its
        plan's streams on a model (as the engine's LockstepHost.slots_needed counts KV slots), and "MODEL (head)"
        for the early-exit streams the engine reads from the base's forward (no slot, one head row each)."""
        from server.lockstep.host import exit_streams

        ids, spec = self._resolve(fields, 0, 1)
        read = exit_streams(spec, ids, self.exits)
        need = collections.Counter([self.group.base])
        need.update(s.model + HEAD if i in read else s.model
                    for i, s in enumerate(spec.streams if spec else ()) if s.model is not None)
        return dict(need)

    def step_batches(self, rows: dict[str, int], clients: int) -> tuple[int, dict[str, int]]:
        """(requests stepped together at `clients` clients, the batch of each model's forward or head)."""
        admitted = min(clients, *(self.group.max_batch_size // n for m, n in rows.items() if not m.endswith(HEAD)))
        return admitted, {model: admitted * n for model, n in rows.items()}

    def forward_s(self, model: str, batch: int, steps: int, generated: int) -> float:
        """Median time of one batched decode forward of `model` over `batch` sequences (chat prompts, different per
        row) about `generated` tokens past their prompt, on the engine's ModelRunner; for "MODEL (head)", of its
        head over `batch` hidden states."""
        import torch

        from server.lockstep.runner import ModelRunner

        warm = 3
        if model.endswith(HEAD):
            runner = ModelRunner(self.models[model.removesuffix(HEAD)], vocab_size=self.vocab, max_slots=1, max_len=1)
            hidden = torch.randn(batch, runner.model.config.hidden_size, dtype=runner.model.dtype)
            samples = []
            for _ in range(warm + steps):
                begun = time.perf_counter()
                runner.head(hidden)
                samples.append(time.perf_counter() - begun)
            return statistics.median(samples[warm:])
        prompts = [self._resolve({}, i, 1)[0] for i in range(batch)]
        runner = ModelRunner(self.models[model], vocab_size=self.vocab, max_slots=batch,
                             max_len=max(len(p) for p in prompts) + generated + warm + steps)
        slots = []
        for ids in prompts:  # the prompt and stand-in generated tokens, so the timed steps straddle `generated`
            slot = runner.open()
            runner.extend(slot, (ids * 2 + ids * (generated // len(ids)))[:len(ids) + max(0, generated - steps // 2)])
            slots.append(slot)
        tokens = [ids[-1] for ids in prompts]
        samples = []
        with torch.inference_mode():
            for _ in range(warm + steps):
                begun = time.perf_counter()
                runner.decode(slots, tokens)
                samples.append(time.perf_counter() - begun)
        return statistics.median(samples[warm:])

    def naive(self, fields: dict, i: int, max_tokens: int) -> int:
        """One request the research-script way; returns the tokens generated."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        models, vocab = self.models, self.vocab

        class RecomputeStreams(LogitsProcessor):
            def __init__(self, spec, prompt_len):
                self.spec, self.plan, self.prompt_len = spec, spec.build(), prompt_len

            def __call__(self, input_ids, scores):
                generated = input_ids[0, self.prompt_len:].tolist()
                base = scores[0, :vocab].float()
                streams = [base if s.model is None else
                           models[s.model](torch.tensor([list(s.ids) + generated])).logits[0, -1, :vocab].float()
                           for s in self.spec.streams]
                fused = self.plan.step(base, torch.stack(streams) if streams else base.new_empty((0, vocab)),
                                       len(generated))
                fused = self.plan.forcing(fused, len(generated))
                out = torch.full_like(scores, float("-inf"))
                out[0, :vocab] = fused
                return out

        ids, spec = self._resolve(fields, i, max_tokens)
        processors = LogitsProcessorList([RecomputeStreams(spec, len(ids))] if spec else [])
        with torch.inference_mode():
            out = models[self.group.base].generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                                   min_new_tokens=max_tokens, do_sample=False,
                                                   logits_processor=processors,
                                                   pad_token_id=self.tokenizer.eos_token_id)
        return out.shape[1] - len(ids)


def engine_time_per_token(config_path: str, max_tokens: int, requests: int) -> dict:
    """Inter-token latency p50 (s) of plain decoding and of CD on the transformers engine in-process, one request at
    a time: the lock-step engine without the server's streaming hops. Run in a fresh process (the engine's torch
    thread must be the process's only one, see TransformersEngine)."""
    from server.config import load_deploy_file
    from server.engines.transformers_engine import TransformersEngine
    from server.service import to_generation_request

    config = load_deploy_file(config_path).chorus
    group = next(iter(config.groups.values()))
    engine = TransformersEngine(config.models[group.base], group, config)

    async def gaps(i: int, fields: dict) -> list[float]:
        arrivals = [time.perf_counter()]
        request = to_generation_request(generate_request(fields, i, max_tokens), f"engine-{i}", None)
        async for _ in engine.generate(request):
            arrivals.append(time.perf_counter())
        return [b - a for a, b in zip(arrivals[1:], arrivals[2:])]  # after the first token

    try:
        result = {}
        for name in ("plain", "cd"):
            fields = strategies()[name]
            asyncio.run(gaps(10_000, fields))  # warm-up
            result[name] = statistics.median(g for i in range(requests) for g in asyncio.run(gaps(i, fields)))
        return result
    finally:
        engine.shutdown()


def repetition_ratios(rep: dict, names: list[str], levels: list[int], floors: dict | None) -> dict:
    """Every ratio of one repetition; `floors`: {name: {level: seconds}} from this repetition's forward times."""
    chorus, naive = rep["chorus"], rep["naive"]
    low = levels[0]
    ratios = {}
    for name in names:
        if name == "plain":
            continue
        for c in levels:
            ratios[f"{name}_vs_plain_at_{c}"] = chorus[name][c]["tokens_per_s"] / chorus["plain"][c]["tokens_per_s"]
    for name in naive:
        for c in reversed(levels):
            ratios[f"{name}_at_{c}_vs_naive"] = chorus[name][c]["tokens_per_s"] / naive[name]
    if floors:
        for name in names:
            for c in levels:
                ratios[f"{name}_itl_p50_at_{c}_vs_forward_floor"] = chorus[name][c]["itl_ms_p50"] / 1000 / \
                    floors[name][c]
        base = rep["forward_s"]["base"]["1"]
        ratios[f"server_plain_itl_at_{low}_vs_base_forward"] = chorus["plain"][low]["itl_ms_p50"] / 1000 / base
        engine = rep["engine_itl_s_p50"]
        ratios["engine_plain_itl_vs_base_forward"] = engine["plain"] / base
        if "cd" in floors and low == 1:  # one request: the floor at 1 client is the in-process engine's too
            ratios["engine_cd_itl_vs_forward_floor"] = engine["cd"] / floors["cd"][low]
    return ratios


def main() -> int:
    def strategy_arguments(parser):
        parser.add_argument("--naive-requests", type=int, default=1, help="naive requests per strategy and repetition")
        parser.add_argument("--naive-tokens", type=int, help="tokens per naive request (default: --max-tokens)")
        parser.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
        parser.add_argument("--no-floors", action="store_true",
                            help="skip the forward floors and the in-process engine (skipped on a vLLM base)")
        parser.add_argument("--floor-steps", type=int, default=16, help="timed forwards per model and batch")
        parser.add_argument("--engine-requests", type=int, default=2,
                            help="in-process engine requests per mode and repetition")
        parser.add_argument("--only", nargs="*", help="strategy names to run (default: all; plain always runs)")

    args, levels, out, totals = load_arguments(__doc__, "strategies", [1, 8], 48, 4, strategy_arguments)
    from server.config import load_deploy_file

    config = load_deploy_file(args.config).chorus
    on_vllm = config.models[next(iter(config.groups.values())).base].engine == "vllm"
    cases = {k: v for k, v in strategies().items() if not args.only or k in args.only or k == "plain"}
    names = list(cases)
    with_floors = not args.no_floors and not on_vllm
    reps, load_before = args.repetitions, os.getloadavg()
    naive_tokens = args.naive_tokens or args.max_tokens
    local_steps = (2 if with_floors else 0) + (0 if args.no_naive else len(names))
    progress = Progress(total=reps * (len(names) * len(levels) + local_steps))
    log_path = out / f"{args.name}-server.log"
    log_path.write_text("")
    progress.line(f"{reps} repetition(s) of: {', '.join(names)} through the server at {levels} client(s) "
                  f"(requests per level {totals}, {args.max_tokens} tokens each)"
                  + ("; engine in-process, forward floors" if with_floors else "")
                  + ("" if args.no_naive else f"; naive x {args.naive_requests}"))

    local: LocalModels | None = None
    rows, batches, per_repetition = {}, {}, []
    for rep in range(reps):
        rep_started, tag = time.time(), f"rep {rep + 1}/{reps}"
        strategies_order = names[1:] if rep % 2 == 0 else names[:0:-1]
        order = ["plain", *strategies_order]

        def measure_every_strategy(address: str) -> dict:
            return {name: asyncio.run(run_server_levels(address, levels, totals, args.max_tokens, progress,
                                                        f"{tag} server {name}", cases[name]))
                    for name in order}

        chorus = with_server(args.config, log_path, measure_every_strategy, progress)
        if chorus is None:
            return 1
        record = {"order": order, "chorus": {name: chorus[name] for name in names}, "naive": {}}

        if with_floors:
            progress.begin(f"{tag} engine in-process (fresh process), plain and cd, "
                           f"{args.engine_requests} request(s) each, one at a time")
            record["engine_itl_s_p50"] = in_fresh_process(engine_time_per_token, args.config, args.max_tokens,
                                                          args.engine_requests)
            progress.end(", ".join(f"{k} ITL p50 {1000 * v:.0f} ms" for k, v in record["engine_itl_s_p50"].items()))
        if local is None and (with_floors or not args.no_naive):
            progress.line("loading the models here (forward floors, naive runs)")
            local = LocalModels(args.config)
        if with_floors:
            if not rows:
                rows = {name: local.rows(cases[name]) for name in names}
                batches = {name: {c: local.step_batches(rows[name], c) for c in levels} for name in names}
            needed = sorted({(model, b) for name in names for c in levels for model, b in batches[name][c][1].items()}
                            | {(local.group.base, 1), (local.group.guides_with_role("amateur")[0].model, 1)})
            progress.begin(f"{tag} forward floors: {len(needed)} model/batch pairs, "
                           f"{args.floor_steps} forwards each")
            forward_s: dict[str, dict[str, float]] = {}
            for model, b in needed:
                forward_s.setdefault(model, {})[str(b)] = local.forward_s(model, b, args.floor_steps,
                                                                         generated=args.max_tokens // 2)
                progress.tick(f"{model} at batch {b}: {1000 * forward_s[model][str(b)]:.0f} ms")
            record["forward_s"] = {**forward_s, "base": forward_s[local.group.base],
                                   "amateur": forward_s[local.group.guides_with_role("amateur")[0].model]}
            progress.end("; ".join(f"{m}: " + ", ".join(f"{b}: {1000 * s:.0f} ms" for b, s in by.items())
                                   for m, by in forward_s.items()))
        if not args.no_naive:
            for name in order:
                progress.begin(f"{tag} naive {name}, {args.naive_requests} request(s) x {naive_tokens} tokens")
                local.naive(cases[name], 10_000, 4)  # warm-up
                begun = time.perf_counter()
                tokens = sum(local.naive(cases[name], rep * args.naive_requests + i, naive_tokens)
                             for i in range(args.naive_requests))
                record["naive"][name] = tokens / (time.perf_counter() - begun)
                progress.end(f"{record['naive'][name]:.1f} tok/s")
        per_repetition.append(record)
        progress.repetition_done(rep, reps, rep_started)

    # ---- aggregate ----
    def floors_of(rep: dict) -> dict | None:
        if not with_floors:
            return None
        return {name: {c: sum(rep["forward_s"][model][str(b)] for model, b in batches[name][c][1].items())
                       for c in levels} for name in names}

    ratios, ratio_spread = aggregate_ratios([repetition_ratios(rep, names, levels, floors_of(rep))
                                             for rep in per_repetition])
    chorus = {name: {c: aggregate([rep["chorus"][name][c] for rep in per_repetition]) for c in levels}
              for name in names}
    naive = {}
    if not args.no_naive:
        for name in names:
            s = spread([rep["naive"][name] for rep in per_repetition])
            naive[name] = {"tokens_per_s": s["median"], "range": [s["min"], s["max"]],
                           "requests_per_repetition": args.naive_requests, "tokens_per_request": naive_tokens}
    forward_floor, forward_batch1, engine_itl = None, {}, {}
    if with_floors:
        floors = [floors_of(rep) for rep in per_repetition]
        models = [m for m in per_repetition[0]["forward_s"] if m not in ("base", "amateur")]
        forward_floor = {
            "rows_per_request": rows,
            "steps": {name: {c: {"requests": batches[name][c][0], "batch": batches[name][c][1],
                                 "floor_s": statistics.median(f[name][c] for f in floors),
                                 "floor_s_range": [min(f[name][c] for f in floors), max(f[name][c] for f in floors)]}
                             for c in levels} for name in names},
            "forward_s": {m: {b: statistics.median(rep["forward_s"][m][b] for rep in per_repetition)
                              for b in per_repetition[0]["forward_s"][m]} for m in models},
        }
        forward_batch1 = {role: statistics.median(rep["forward_s"][role]["1"] for rep in per_repetition)
                          for role in ("base", "amateur")}
        engine_itl = {k: statistics.median(rep["engine_itl_s_p50"][k] for rep in per_repetition)
                      for k in ("plain", "cd")}
    report = {"config": args.config, "max_tokens": args.max_tokens, "levels": levels, "requests_per_level": totals,
              "repetitions": reps, "chorus": chorus, "naive": naive, "forward_floor": forward_floor,
              "forward_s_batch1": forward_batch1, "engine_itl_s_p50": engine_itl, "ratios": ratios,
              "ratio_spread": ratio_spread, "per_repetition": per_repetition,
              "run_s": time.time() - progress.started, "machine": machine_info(load_before)}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{args.name}.png", f"{args.name}: {args.config}, {args.max_tokens} tokens/request, "
                                           f"median and range of {reps} repetition(s)")
    print_table(report)
    print_ratios(ratio_spread)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')} in {report['run_s']:.0f} s")
    return 0


def print_table(report: dict) -> None:
    levels, floor = report["levels"], report["forward_floor"]
    print(f"medians [min-max] over {report['repetitions']} repetition(s); step = ITL p50 through the server, "
          f"floor = the sum of its models' forwards at that level's batch")
    for c in levels:
        print(f"-- {c} client(s)")
        print(f"{'strategy':<15} {'tok/s':>18} {'ITL p50 (ms)':>16} {'ITL p99 (ms)':>18} {'floor (ms)':>11} "
              f"{'batch':>22} {'naive tok/s':>12}")
        for name, by_level in report["chorus"].items():
            r = by_level[c]
            step = floor["steps"][name][c] if floor else None
            batch = ", ".join(f"{m.split('-')[-1]}:{b}" for m, b in step["batch"].items()) if step else ""
            naive = report["naive"].get(name)
            print(f"{name:<15} {with_range(r['tokens_per_s'], *r['range']['tokens_per_s'], 1):>18} "
                  f"{with_range(r['itl_ms_p50'], *r['range']['itl_ms_p50']):>16} "
                  f"{with_range(r['itl_ms_p99'], *r['range']['itl_ms_p99']):>18} "
                  f"{1000 * step['floor_s'] if step else float('nan'):>11.0f} {batch:>22} "
                  f"{naive['tokens_per_s'] if naive else float('nan'):>12.1f}")


def plot(report: dict, path: Path, title: str) -> None:
    """Left: tokens/s per strategy and level (medians, bars from min to max) and naive. Right, with floors: time per
    step at the highest level (ITL p50 through the server) next to the sum of its models' forwards."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chorus, naive, floor = report["chorus"], report["naive"], report["forward_floor"]
    names, levels = list(chorus), report["levels"]
    fig, axes = plt.subplots(1, 2 if floor else 1, figsize=(18 if floor else 12, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if floor else None)
    ax = axes[0][0]
    width = 0.8 / (len(levels) + (1 if naive else 0))

    def bars(ax, offset, entries, label):
        med = [e[0] for e in entries]
        err = [[m - e[1] for m, e in zip(med, entries)], [e[2] - m for m, e in zip(med, entries)]]
        ax.bar([i + offset for i in range(len(names))], med, width, yerr=err, capsize=3, label=label)

    for j, c in enumerate(levels):
        bars(ax, j * width, [(chorus[n][c]["tokens_per_s"], *chorus[n][c]["range"]["tokens_per_s"]) for n in names],
             f"Chorus, {c} client(s)")
    if naive:
        bars(ax, len(levels) * width, [(naive[n]["tokens_per_s"], *naive[n]["range"]) for n in names],
             "naive (one at a time, recompute)")
    ax.set_xticks([i + width * len(levels) / 2 for i in range(len(names))], names)
    ax.set_ylabel("completion tokens/s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    if floor:
        ax = axes[0][1]
        high = levels[-1]
        width = 0.4
        bars(ax, 0, [(chorus[n][high]["itl_ms_p50"], *chorus[n][high]["range"]["itl_ms_p50"]) for n in names],
             f"time per step (ITL p50), {high} clients")
        steps = floor["steps"]
        bars(ax, width, [(1000 * steps[n][high]["floor_s"], *(1000 * x for x in steps[n][high]["floor_s_range"]))
                         for n in names], "its models' forwards at that batch")
        ax.set_xticks([i + width / 2 for i in range(len(names))], names, rotation=30)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
