"""Guide models stepped in lock-step with a base model that runs elsewhere (inside vLLM), independent of vLLM.

The vLLM logits-processor adapters (server/engines/vllm_fusion.py) translate vLLM's batch bookkeeping into three
calls on a GuideHost, keyed by an opaque request key:

    add(key, plan_spec, generated)   open the plan's streams (one KV slot each) and prefill them with their contexts
                                     (plus `generated`, when a preempted request comes back)
    fuse(logits, rows)               for each (key, row, generated): feed the tokens the base sampled since the last
                                     call to the streams (one batched forward per guide model across all requests),
                                     then overwrite the row with the plan's fused scores (forced tokens one-hot)
    remove(key)                      free the streams; the plan is kept (a bounded number of them) in case vLLM
                                     preempted the request and adds it back, so a refusal decision and the
                                     report's records survive

Only requests whose SamplingParams carry a plan are added, so plain requests pay nothing. After every fused step the
step's record goes to `sink` (one small message per step, whatever the request's length): the other side collects
them in `StepRecords` and rebuilds the plan's report from its spec.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import torch

from decoding.plans import Plan, PlanSpec
from decoding.strategies import Report
from server.lockstep.runner import ModelRunner, Slot, decode_streams

ReportSink = Callable[[str, int, object, dict], None]
"""(request key, position, the plan's record of that step, the request's forward passes per guide model so far)."""


@dataclasses.dataclass
class StepRecords:
    """What a sink received for one request: the plan's record per fused position (a position fused again replaces
    its record) and the latest forward-pass counts of its guide models."""
    records: dict[int, object] = dataclasses.field(default_factory=dict)
    forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, position: int, record: object, forward_passes: dict[str, int]) -> None:
        self.records[position] = record
        self.forward_passes = forward_passes

    @property
    def steps(self) -> int:
        return len(self.records)

    def report(self, spec: PlanSpec) -> Report:
        return spec.build().replay(self.records).report()


@dataclasses.dataclass(eq=False)
class _Request:
    plan: Plan
    # Per plan stream: (model name, slot), or None where the plan reuses the base's own logits.
    streams: list[tuple[str, Slot] | None]
    fed: int  # generated tokens the streams have seen
    pending: list[torch.Tensor]  # the streams' logits for the next step, when already computed (after prefill)
    forward_passes: collections.Counter


class GuideHost:
    # Plans of removed requests kept for a possible return after preemption (oldest dropped first).
    PARKED_PLANS = 1024

    def __init__(self, runners: dict[str, ModelRunner], vocab_size: int, sink: ReportSink):
        self.runners = runners
        self.vocab_size = vocab_size
        self._sink = sink
        self._requests: dict[str, _Request] = {}
        self._parked: collections.OrderedDict[str, tuple[Plan, collections.Counter]] = collections.OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._requests

    def add(self, key: str, spec: PlanSpec, generated: Sequence[int] = ()) -> None:
        if key in self._requests:
            self.remove(key)
        need = collections.Counter(s.model for s in spec.streams if s.model is not None)
        for name, n in need.items():
            if self.runners[name].free_slots < n:
                raise RuntimeError(f"guide model {name!r} has {self.runners[name].free_slots} free KV slots, "
                                   f"a request needs {n}")
        plan, passes = self._parked.pop(key, None) or (spec.build(), collections.Counter())
        request = _Request(plan=plan, streams=[], fed=len(generated), pending=[], forward_passes=passes)
        for stream in spec.streams:
            if stream.model is None:
                request.streams.append(None)
                continue
            slot = self.runners[stream.model].open()
            request.streams.append((stream.model, slot))
            request.pending.append(self.runners[stream.model].extend(slot, [*stream.ids, *generated]))
            request.forward_passes[stream.model] += 1
        self._requests[key] = request

    def remove(self, key: str) -> None:
        request = self._requests.pop(key, None)
        if request is None:
            return
        for stream in request.streams:
            if stream is not None:
                self.runners[stream[0]].close(stream[1])
        self._parked[key] = (request.plan, request.forward_passes)
        while len(self._parked) > self.PARKED_PLANS:
            self._parked.popitem(last=False)

    def fuse(self, logits: torch.Tensor, rows: Sequence[tuple[str, int, Sequence[int]]]) -> None:
        """Rewrites `logits[row]` in place for each (key, row, generated tokens so far) of a hosted request.

        A row with no new token since the last call (vLLM samples, then discards, rows of partial prefills) is
        fused again from the same stream logits, at the same position. Only the streams of requests with a new
        token step, one batched forward per guide model."""
        one_step: list[tuple[str, Slot, int]] = []
        stepping: list[_Request] = []
        for key, _, generated in rows:
            request = self._requests[key]
            new = list(generated[request.fed:])
            request.fed = len(generated)
            streams = self._guide_streams(request)
            if len(new) == 1:
                one_step.extend((name, slot, new[0]) for name, slot in streams)
                stepping.append(request)
            elif new:  # several tokens since the last step (a scheduler that skipped this request's rows)
                request.pending = [self.runners[name].extend(slot, new) for name, slot in streams]
            for name, _ in streams if new else ():
                request.forward_passes[name] += 1
        stepped = iter(decode_streams(self.runners, one_step))
        for request in stepping:
            request.pending = [next(stepped) for _ in self._guide_streams(request)]
        vocab = self.vocab_size
        for key, row, generated in rows:
            request = self._requests[key]
            base = logits[row, :vocab].float()
            guide_rows = iter(request.pending)
            streams = [base if s is None else next(guide_rows) for s in request.streams]
            position = len(generated)
            scores = request.plan.step(base, torch.stack(streams) if streams else base.new_empty((0, vocab)), position)
            scores = request.plan.forcing(scores, position)
            logits[row, :vocab] = scores.to(logits.dtype)
            logits[row, vocab:] = float("-inf")
            self._sink(key, position, request.plan.record(position), dict(request.forward_passes))

    @staticmethod
    def _guide_streams(request: _Request) -> list[tuple[str, Slot]]:
        return [s for s in request.streams if s is not None]
