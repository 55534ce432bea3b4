"""`chorus calibrate-entropy`: the entropy-switching threshold of a model group for a target large-model fraction.

1. The group's engine is built in-process from the deploy file (no Ray, no gRPC). Every prompt (a user chat
   message) is decoded greedily by the small model alone: entropy switching with threshold +inf and a trace, so
   the rolling entropies are the ones the switching rule would see, computed by the same code.
2. A first guess is the (1 − target) quantile q of those rolling entropies (decoding/entropy_switch.py
   `threshold_for_fraction`). It is only a guess: once the large model writes, its own entropies (often of another
   scale) enter the window, and the minimum span delays switches; on SmolLM2-135M with its 8-layer early exit as
   the small model the guess for 0.4 gave 0.84.
3. So the prompts are decoded with real switching (the window and minimum span given) at that threshold, the large
   model's share of the tokens is measured, and the quantile is bisected (higher q, higher τ, fewer large tokens)
   until the share is within `tolerance` of the target or `rounds` runs are done; the run closest to the target
   wins.
The result is a line to paste into the group's config (`entropy_threshold`), naming the prompts it was made on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path

from decoding.chat import ChatMessage
from decoding.entropy_switch import threshold_for_fraction
from decoding.sampling import SamplingParams
from decoding.strategies import EntropySwitchParams, EntropySwitchReport
from server.engines.base import GenerationRequest


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment)")
    return prompts


@dataclasses.dataclass
class Calibration:
    threshold: float
    target: float
    measured_fraction: float  # the large model's share of tokens in the run at `threshold`
    prompts: int
    tokens: int  # completion tokens the small model wrote in the probe run
    window: int
    min_span: int
    runs: list[tuple[float, float]]  # (threshold, measured large fraction) of every switching run, in order
    seconds: float

    def config_line(self, source: str) -> str:
        return (f"entropy_threshold: {self.threshold:.3f}  # chorus calibrate-entropy: {source}, {self.prompts} "
                f"prompts, greedy, window {self.window}, min_span {self.min_span}: large fraction "
                f"{self.measured_fraction:.2f} (target {self.target:.2f})")


async def _decode_all(engine, prompts: list[str], strategy: EntropySwitchParams, max_tokens: int,
                      concurrency: int) -> list[EntropySwitchReport]:
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: str) -> EntropySwitchReport:
        request = GenerationRequest(request_id=f"calibrate-{i}", messages=(ChatMessage("user", prompt),),
                                    sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                    strategy=strategy)
        async with limit:
            async for chunk in engine.generate(request):
                if chunk.finish_reason is not None:
                    return chunk.report
        raise RuntimeError(f"prompt {i}: the stream ended without a final chunk")

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def calibrate_entropy(engine, prompts: list[str], target: float = 0.4, max_tokens: int = 64, window: int = 5,
                      min_span: int = 10, concurrency: int = 8, small: str = "", rounds: int = 6,
                      tolerance: float = 0.05, log=print) -> Calibration:
    """Runs steps 1-3 of the module docstring on `engine` (a built engine of the group)."""
    started = time.perf_counter()
    probe = EntropySwitchParams(threshold=math.inf, window=window, min_span=0, small=small, trace=True).validate()
    reports = asyncio.run(_decode_all(engine, prompts, probe, max_tokens, concurrency))
    rolling = [step.rolling_entropy for report in reports for step in report.trace]
    low, high = 0.0, 1.0  # the quantile of the small model's rolling entropies that τ is
    quantile = 1.0 - target
    runs: list[tuple[float, float]] = []
    for _ in range(rounds):
        threshold = threshold_for_fraction(rolling, 1.0 - quantile) if 0 < quantile < 1 else (
            min(rolling) if quantile <= 0 else max(rolling))
        switching = EntropySwitchParams(threshold=threshold, window=window, min_span=min_span, small=small)
        checked = asyncio.run(_decode_all(engine, prompts, switching.validate(), max_tokens, concurrency))
        steps = sum(r.steps for r in checked)
        fraction = sum(r.large_tokens for r in checked) / steps if steps else 0.0
        runs.append((threshold, fraction))
        log(f"[chorus]   threshold {threshold:.4f} bits (quantile {quantile:.3f} of the small model's rolling "
            f"entropies): large fraction {fraction:.3f} ({time.perf_counter() - started:.0f} s)")
        if abs(fraction - target) <= tolerance:
            break
        if fraction > target:
            low = quantile
        else:
            high = quantile
        quantile = (low + high) / 2
    threshold, fraction = min(runs, key=lambda run: abs(run[1] - target))
    return Calibration(threshold=threshold, target=target, measured_fraction=fraction, prompts=len(prompts),
                       tokens=len(rolling), window=window, min_span=min_span, runs=runs,
                       seconds=time.perf_counter() - started)
