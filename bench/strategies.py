"""Token-level strategies: tokens/s through the running server against plain decoding of the base and against a
naive research-style implementation, all in one run.

    .venv/bin/python -m bench.strategies [--config deploy/local.yaml] [--name strategies] [--max-tokens 48]
    .venv/bin/python -m bench.strategies --config deploy/local-vllm.yaml --name strategies-vllm --no-naive

Chorus: `chorus serve` in a separate process, driven over gRPC by closed-loop clients (bench/run.py) at concurrency
1 and 8, greedy, `ignore_eos`, fixed max_tokens; one pass per strategy and mode, plain decoding first and again
last (the baseline of the ratios is the mean of the two; their spread shows the run's noise).

Naive: what the papers' reference scripts do — one request at a time, transformers `generate` with the base model's
KV cache, and a LogitsProcessor that recomputes every other stream (amateur, lame/negative context, experts) from
scratch on its whole context at every step, then applies the same fusion math (decoding/plans.py). Its throughput
does not depend on concurrency (requests are served one after another).

Forward times: one decode forward at batch 1 of the base and of the amateur on the slot cache (median of 20 after
warm-up, context ~50 tokens), to compare CD's time per token with base + amateur, both through the server and on
the transformers engine in-process (a fresh process, one request at a time; transformers configs only).
Writes <out>/<name>.json and .png. Timings are never asserted anywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

from bench.run import load_arguments, prompt, run_server_levels, with_server


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


def naive_runner(config_path: str):
    """A research-script implementation per strategy: HF generate + a LogitsProcessor recomputing the other streams."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from server.config import load_deploy_file
    from server.lockstep.guides import ModelLoader
    from server.strategies.registry import PlanResolver
    from server.engines.prompts import load_tokenizer, render_prompt
    from server.models import resolve_model_path
    from server.service import to_generation_request
    from chorus.v1 import decoding_pb2 as pb

    config = load_deploy_file(config_path).chorus
    group = next(iter(config.groups.values()))
    loader = ModelLoader(config.models)
    models = {name: loader.load(name) for name in {group.base, *group.guide_models}}
    tokenizer = load_tokenizer(resolve_model_path(config.models[group.base].path))
    resolver = PlanResolver(group, tokenizer, 2048)
    vocab = len(tokenizer)

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

    def run(fields: dict, i: int, max_tokens: int) -> int:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt(i))],
                                     sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                ignore_eos=True), **fields)
        domain = to_generation_request(request, f"naive-{i}", None)
        ids = render_prompt(tokenizer, domain)
        spec = resolver.resolve(domain, ids)
        processors = LogitsProcessorList([RecomputeStreams(spec, len(ids))] if spec else [])
        with torch.inference_mode():
            out = models[group.base].generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                              min_new_tokens=max_tokens, do_sample=False,
                                              logits_processor=processors, pad_token_id=tokenizer.eos_token_id)
        return out.shape[1] - len(ids)

    def forward_times() -> dict:
        from server.lockstep.runner import ModelRunner
        times = {}
        ids = tokenizer.encode(prompt(0) * 3)[:50]
        for role, name in (("base", group.base), ("amateur", group.guides_with_role("amateur")[0].model)):
            runner = ModelRunner(models[name], vocab_size=vocab, max_slots=1, max_len=256)
            slot = runner.open()
            runner.extend(slot, ids)
            samples = []
            for step in range(25):
                started = time.perf_counter()
                runner.decode([slot], [ids[step % len(ids)]])
                samples.append(time.perf_counter() - started)
            times[role] = statistics.median(samples[5:])
        return times

    return run, forward_times


def engine_time_per_token(config_path: str, max_tokens: int, requests: int = 3) -> dict:
    """Inter-token latency p50 (s) of plain decoding and of CD on the transformers engine in-process, one request at
    a time: the lock-step engine without the server's streaming hops. Run in a fresh process (the engine's torch
    thread must be the process's only one, see TransformersEngine)."""
    from chorus.v1 import decoding_pb2 as pb
    from server.config import load_deploy_file
    from server.engines.transformers_engine import TransformersEngine
    from server.service import to_generation_request

    config = load_deploy_file(config_path).chorus
    group = next(iter(config.groups.values()))
    engine = TransformersEngine(config.models[group.base], group, config)

    async def gaps(i: int, fields: dict) -> list[float]:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt(i))],
                                     sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                ignore_eos=True), **fields)
        arrivals = [time.perf_counter()]
        async for _ in engine.generate(to_generation_request(request, f"engine-{i}", None)):
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


def main() -> int:
    def strategy_arguments(parser):
        parser.add_argument("--naive-requests", type=int, default=3)
        parser.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
        parser.add_argument("--only", nargs="*", help="strategy names to run (default: all)")

    args, levels, out, total_for = load_arguments(__doc__, "strategies", [1, 8], 48, 4, strategy_arguments)
    import torch
    cases = {k: v for k, v in strategies().items() if not args.only or k in args.only or k == "plain"}
    started, load_before = time.time(), os.getloadavg()

    def measure_every_strategy(address: str) -> dict:
        measured = {}
        for name, fields in [*cases.items(), ("plain_again", {})]:
            measured[name] = asyncio.run(run_server_levels(address, levels, total_for, args.max_tokens, fields))
            print(name, {c: round(measured[name][c]["tokens_per_s"], 1) for c in levels}, flush=True)
        return measured

    chorus = with_server(args.config, out / f"{args.name}-server.log", measure_every_strategy)
    if chorus is None:
        return 1

    naive, forward, engine_itl = {}, {}, {}
    if not args.no_naive:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            engine_itl = pool.submit(engine_time_per_token, args.config, args.max_tokens).result()
        print("in-process engine ITL p50 (s)", engine_itl, flush=True)
        torch.set_num_threads(os.cpu_count())
        run, forward_times = naive_runner(args.config)
        forward = forward_times()
        for name, fields in cases.items():
            run(fields, 10_000, 4)  # warm-up
            begun = time.perf_counter()
            tokens = sum(run(fields, i, args.max_tokens) for i in range(args.naive_requests))
            naive[name] = {"tokens_per_s": tokens / (time.perf_counter() - begun), "requests": args.naive_requests}
            print("naive", name, round(naive[name]["tokens_per_s"], 1), flush=True)

    low, high = levels[0], levels[-1]
    # Plain decoding ran first and again last: the baseline is their mean, their spread the run's noise.
    plain = {c: (chorus["plain"][c]["tokens_per_s"] + chorus["plain_again"][c]["tokens_per_s"]) / 2 for c in levels}
    ratios = {f"plain_again_vs_plain_at_{c}": chorus["plain_again"][c]["tokens_per_s"] / chorus["plain"][c]["tokens_per_s"]
              for c in levels}
    for name in cases:
        r = chorus[name]
        ratios[f"{name}_vs_plain_at_{low}"] = r[low]["tokens_per_s"] / plain[low]
        ratios[f"{name}_vs_plain_at_{high}"] = r[high]["tokens_per_s"] / plain[high]
        if name in naive:
            ratios[f"{name}_at_{high}_vs_naive"] = r[high]["tokens_per_s"] / naive[name]["tokens_per_s"]
            ratios[f"{name}_at_{low}_vs_naive"] = r[low]["tokens_per_s"] / naive[name]["tokens_per_s"]
    if forward and "cd" in chorus:
        both = forward["base"] + forward["amateur"]
        ratios[f"server_cd_itl_at_{low}_vs_base_plus_amateur_forward"] = chorus["cd"][low]["itl_ms_p50"] / 1000 / both
        ratios[f"server_plain_itl_at_{low}_vs_base_forward"] = chorus["plain"][low]["itl_ms_p50"] / 1000 / forward["base"]
        ratios["engine_cd_itl_vs_base_plus_amateur_forward"] = engine_itl["cd"] / both
        ratios["engine_plain_itl_vs_base_forward"] = engine_itl["plain"] / forward["base"]
    report = {"config": args.config, "max_tokens": args.max_tokens, "levels": levels,
              "chorus": chorus, "naive": naive, "forward_s_batch1": forward, "engine_itl_s_p50": engine_itl,
              "ratios": ratios,
              "run_s": time.time() - started,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{args.name}.png", f"{args.name}: {args.config}, {args.max_tokens} tokens/request")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"wrote {out / (args.name + '.json')} in {report['run_s']:.0f} s")
    return 0


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["chorus"])
    levels = report["levels"]
    width = 0.8 / (len(levels) + (1 if report["naive"] else 0))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for j, c in enumerate(levels):
        ax.bar([i + j * width for i in range(len(names))], [report["chorus"][n][c]["tokens_per_s"] for n in names],
               width, label=f"Chorus, {c} client(s)")
    if report["naive"]:
        ax.bar([i + len(levels) * width for i in range(len(names))],
               [report["naive"].get(n, {}).get("tokens_per_s", 0) for n in names], width,
               label="naive (one at a time, recompute)")
    ax.set_xticks([i + width * len(levels) / 2 for i in range(len(names))], names)
    ax.set_ylabel("completion tokens/s")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
