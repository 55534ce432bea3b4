"""Per-request lock-step plans: which extra model streams a strategy steps, and how one step's logits are fused.

A *stream* is one model under one context, extended with the same generated tokens as the base sequence (the
base model on the request's prompt is stream "base" and is not listed). Engines step every stream of every live
request together, one batched forward per model, and hand each request's rows to its plan:

    scores = plan.step(base_logits [V], stream_logits [S, V], position)   # float32; -inf = excluded
    token  = plan.forced_token(position) or sample(scores / T_out)

For a batch of requests whose plans share a class, `Plan.step_rows(plans, base [B, V], streams, positions)` gives
the same rows and records; contrastive and logit-fusion plans fuse all rows of one mode in one call of the math,
with the requests' knobs as per-row tensors.

`position` is the number of tokens generated so far. A step repeated at the same position (vLLM fuses the rows of
partial prefills, then discards their tokens) replaces that position's record, so reports count each generated
token once.

Plans hold the per-request state (step counter, report, forced tokens) and call the pure math of
contrastive.py, logit_fusion.py and refusal.py. A `PlanSpec` is the plain-data description an engine builds from a
request (stream models and token ids, knobs); it pickles, so the vLLM logits processor rebuilds the same plan in the
engine-core process.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Hashable, Sequence

import torch

from decoding import contrastive, entropy_switch, logit_fusion, refusal
from decoding.strategies import (ContrastiveParams, ContrastiveReport, EntropySwitchParams, EntropySwitchReport,
                                 EntropySwitchStep, LogitFusionParams, LogitFusionReport, RefusalReport,
                                 RefusalSteeringParams, Report)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One extra stream: `model` (a model name; None = the base model's own logits on the prompt, reused) and the
    context token ids it is prefilled with."""
    model: str | None
    ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """`plan` is the Plan class that runs `params` (the strategy registry pairs them); a class pickles by name."""
    plan: type["Plan"]
    params: ContrastiveParams | LogitFusionParams | RefusalSteeringParams | EntropySwitchParams
    streams: tuple[StreamSpec, ...] = ()
    # Names for the report: the guide (contrastive, entropy switch), small base and experts (fusion).
    guide: str = ""
    experts: tuple[str, ...] = ()
    markers: refusal.RefusalMarkers | None = None
    # Entropy switch: the threshold in force (the request's or the group's default) and P_S / P_L.
    threshold: float = 0.0
    parameter_ratio: float = 1.0

    def build(self) -> "Plan":
        return self.plan(self)


class Plan(abc.ABC):
    params_type: type  # the strategy params a plan of this class runs
    # Whether every step reads the base and every extra stream (`needs_base` and `streams_at` never skip one). An
    # engine may then compute a stream from the base's own forward where it is an early-exit view of the base on
    # the same context (its first k layers are the base's).
    reads_every_stream_every_step = True

    def __init__(self, spec: PlanSpec):
        if not isinstance(spec.params, self.params_type):
            raise TypeError(f"{type(self).__name__} runs {self.params_type.__name__}, "
                            f"not {type(spec.params).__name__}")
        self.spec = spec
        self._records: dict[int, object] = {}  # position → what the step decided: the report is made of these

    @abc.abstractmethod
    def fuse(self, base: torch.Tensor, streams: torch.Tensor, position: int) -> tuple[torch.Tensor, object]:
        """(scores [V], the step's record) from the base row [V] and the extra streams' rows [S, V]."""

    def step(self, base: torch.Tensor, streams: torch.Tensor, position: int) -> torch.Tensor:
        scores, self._records[position] = self.fuse(base, streams, position)
        return scores

    @classmethod
    def step_rows(cls, plans: "Sequence[Plan]", base: torch.Tensor, streams: Sequence[torch.Tensor],
                  positions: Sequence[int]) -> torch.Tensor:
        """Batched `step` for plans of this class: row i equals plans[i].step(base[i], streams[i], positions[i])
        (and records each plan's step exactly as `step` does). base: [B, V] float32; streams[i]: [S_i, V]."""
        return torch.stack([plan.step(base[i], streams[i], positions[i]) for i, plan in enumerate(plans)])

    @classmethod
    def _step_groups(cls, plans: Sequence["Plan"], base: torch.Tensor, streams: Sequence[torch.Tensor],
                     positions: Sequence[int], key: Callable[["Plan"], Hashable],
                     fuse_rows: Callable[[list, torch.Tensor, torch.Tensor], tuple[torch.Tensor, list]]
                     ) -> torch.Tensor:
        """`step_rows` with one call of `fuse_rows(plans, base [G, V], streams [S, G, V]) -> (scores [G, V], one
        record per plan)` per group of rows whose plans share `key(plan)` (rows of one group have the same S)."""
        for plan in plans:
            if not isinstance(plan, cls):
                raise TypeError(f"{cls.__name__}.step_rows got a {type(plan).__name__}")
        if len(plans) != len(base) or len(plans) != len(streams) or len(plans) != len(positions):
            raise ValueError(f"{len(plans)} plans for {len(base)} base rows, {len(streams)} stream sets and "
                             f"{len(positions)} positions")
        groups: dict[Hashable, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(key(plan), []).append(i)
        scores = None
        for rows in groups.values():
            group = [plans[i] for i in rows]
            stacked = torch.stack([streams[i] for i in rows], dim=1)  # [S, G, V]
            if len(rows) == len(plans):  # one group: every row, in order
                scores, records = fuse_rows(group, base, stacked)
            else:
                index = torch.tensor(rows, device=base.device)
                fused, records = fuse_rows(group, base[index], stacked)
                if scores is None:
                    scores = torch.empty(base.shape, dtype=fused.dtype, device=base.device)
                scores[index] = fused
            for i, record in zip(rows, records):
                plans[i]._records[positions[i]] = record
        return scores if scores is not None else base.float().clone()

    def needs_base(self, position: int) -> bool:
        """Whether the step at `position` reads the base model's logits. A plan that lets another model write some
        positions says no there: the engine then skips the base's forward for this request, and the base catches up
        on the skipped tokens (one multi-token extend, its KV cache kept) at the next position that needs it."""
        return True

    def streams_at(self, position: int) -> tuple[int, ...]:
        """The indices of the extra streams the step at `position` reads (the rows `fuse` gets, in this order).
        The others are not stepped there and catch up later like the base."""
        return tuple(range(len(self.spec.streams)))

    @property
    def steps(self) -> int:
        """Positions fused so far."""
        return len(self._records)

    def records(self) -> list:
        return [self._records[p] for p in sorted(self._records)]

    def record(self, position: int) -> object:
        """What the step at `position` decided (small: a flag, a weight vector, a refusal decision)."""
        return self._records[position]

    def replay(self, records: dict[int, object]) -> "Plan":
        """This plan as if it had fused the steps that decided `records` (position → record): a plan rebuilt from
        its spec in another process gives the same report from the records alone."""
        self._records = dict(records)
        return self

    def forced_token(self, position: int) -> int | None:
        """A token the plan imposes instead of sampling at this position (refusal steering), or None."""
        return None

    def forcing(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """`scores`, or, where the plan imposes a token at `position`, 0 on that token and −inf elsewhere (for a
        sampler that cannot be handed the token, such as a logits processor)."""
        forced = self.forced_token(position)
        if forced is None:
            return scores
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[forced] = 0.0
        return one_hot

    @abc.abstractmethod
    def report(self) -> Report: ...


def _knobs(like: torch.Tensor, rows: list[tuple[float, ...]]) -> tuple[torch.Tensor, ...]:
    """Per-row knobs, one tuple per row, as one [B] float32 tensor per knob on `like`'s device (one copy)."""
    return tuple(torch.tensor(rows, dtype=torch.float32).to(like.device).T)


class ContrastivePlan(Plan):
    """cd: streams [amateur on the prompt]; uscd: [base on the lame prompt]; steer: [B on the prompt, base on the
    negative context]."""
    params_type = ContrastiveParams

    def __init__(self, spec: PlanSpec):
        super().__init__(spec)
        self.params: ContrastiveParams = spec.params

    def fuse(self, base, streams, position):
        """Record: whether the step contrasted (always, except USCD where the base was certain)."""
        p = self.params
        if p.mode == "cd":
            return contrastive.contrastive_scores(base[None], streams[:1], p.alpha, p.beta,
                                                  p.amateur_temperature)[0], True
        if p.mode == "uscd":
            scores, contrasted = contrastive.uscd_scores(base[None], streams[:1], p.uncertainty_threshold,
                                                         p.uscd_eta, p.standard_weight, p.lame_weight)
            return scores[0], bool(contrasted[0])
        return contrastive.steer_scores(base[None], streams[0:1], streams[1:2], p.gamma, p.eta)[0], True

    @classmethod
    def step_rows(cls, plans, base, streams, positions):
        """One call of the math per mode, the knobs as per-row tensors."""
        return cls._step_groups(plans, base, streams, positions, lambda plan: plan.params.mode, cls._fuse_rows)

    @staticmethod
    def _fuse_rows(plans: list["ContrastivePlan"], base: torch.Tensor, streams: torch.Tensor):
        mode, params = plans[0].params.mode, [plan.params for plan in plans]
        if mode == "cd":
            knobs = _knobs(base, [(p.alpha, p.beta, p.amateur_temperature) for p in params])
            return contrastive.contrastive_scores(base, streams[0], *knobs), [True] * len(plans)
        if mode == "uscd":
            knobs = _knobs(base, [(p.uncertainty_threshold, p.uscd_eta, p.standard_weight, p.lame_weight)
                                  for p in params])
            scores, contrasted = contrastive.uscd_scores(base, streams[0], *knobs)
            return scores, contrasted.tolist()
        knobs = _knobs(base, [(p.gamma, p.eta) for p in params])
        return contrastive.steer_scores(base, streams[0], streams[1], *knobs), [True] * len(plans)

    def report(self):
        return ContrastiveReport(mode=self.params.mode, guide=self.spec.guide, steps=self.steps,
                                 contrasted_steps=sum(self.records()))


class LogitFusionPlan(Plan):
    """Streams [small base S on the prompt, expert 1, ..., expert T] (each on its own in-context prompt)."""
    params_type = LogitFusionParams

    def __init__(self, spec: PlanSpec):
        super().__init__(spec)
        self.params: LogitFusionParams = spec.params
        experts = len(spec.experts)
        alphas = self.params.alphas or (1.0,)
        self._alphas = torch.tensor(alphas * experts if len(alphas) == 1 else alphas, dtype=torch.float32)
        self._grid = logit_fusion.alpha_grid(self.params.grid_max, self.params.grid_step)

    def fuse(self, base, streams, position):
        """Record: the step's weights per expert."""
        small, experts = streams[:1], streams[1:, None, :]
        if self.params.mode == "static":
            weights = self._alphas
            scores = logit_fusion.static_fusion(base[None], small, experts, weights)[0]
        else:
            scores, chosen = logit_fusion.dynamic_fusion(base[None], small, experts, self._grid)
            scores, weights = scores[0], chosen[0]
        return scores, tuple(float(w) for w in weights)

    @classmethod
    def step_rows(cls, plans, base, streams, positions):
        """One call of the math per mode and number of experts: static α as [B, T]; the dynamic grids as [B, K],
        padded with NaN where the rows' grids differ in length (every row then searches max K candidates' worth)."""
        return cls._step_groups(plans, base, streams, positions,
                                lambda plan: (plan.params.mode, len(plan.spec.streams)), cls._fuse_rows)

    @staticmethod
    def _fuse_rows(plans: list["LogitFusionPlan"], base: torch.Tensor, streams: torch.Tensor):
        small, experts = streams[0], streams[1:]
        if plans[0].params.mode == "static":
            alphas = torch.stack([plan._alphas for plan in plans]).to(base.device)  # [B, T]
            records = [tuple(float(w) for w in plan._alphas) for plan in plans]
            return logit_fusion.static_fusion(base, small, experts, alphas), records
        points = max(len(plan._grid) for plan in plans)
        grids = torch.full((len(plans), points), float("nan"))
        for row, plan in enumerate(plans):
            grids[row, :len(plan._grid)] = plan._grid
        scores, chosen = logit_fusion.dynamic_fusion(base, small, experts, grids.to(base.device))
        return scores, [tuple(weights) for weights in chosen.tolist()]

    def report(self):
        weights = self.records()
        mean = [sum(column) / len(weights) for column in zip(*weights)] if weights else [0.0] * len(self.spec.experts)
        return LogitFusionReport(mode=self.params.mode, small_base=self.spec.guide, experts=self.spec.experts,
                                 steps=self.steps, mean_weights=tuple(mean),
                                 step_weights=weights if self.params.report_weights else [])


class RefusalPlan(Plan):
    """No extra streams: at the first step the refusal decision forces or bans the reply's first tokens."""
    params_type = RefusalSteeringParams

    @property
    def decision(self) -> refusal.RefusalDecision | None:
        """The decision taken at position 0; None before it."""
        return self._records.get(0)

    def fuse(self, base, streams, position):
        """Record: the decision at position 0, None after it."""
        if position:
            return base, None
        params: RefusalSteeringParams = self.spec.params
        decision = refusal.decide(base, self.spec.markers, params.decision)
        if decision.banned:
            base = base.clone()
            base[list(decision.banned)] = float("-inf")
        return base, decision

    def forced_token(self, position):
        forced = self.decision.forced if self.decision is not None else ()
        return forced[position] if position < len(forced) else None

    def report(self):
        d = self.decision
        if d is None:  # finished before its first step (cancelled): nothing was decided
            return RefusalReport(action="none", category=None, probabilities={}, respond_probability=0.0,
                                 forced_token_ids=())
        return RefusalReport(action=d.action, category=d.category, probabilities=dict(d.probabilities),
                             respond_probability=d.respond_probability, forced_token_ids=tuple(d.forced))


class EntropySwitchPlan(Plan):
    """Streams [the small model on the prompt]; the base is the large model. At each position only the active
    model's forward runs (`needs_base` / `streams_at`); the other catches up when it next becomes active."""
    params_type = EntropySwitchParams
    reads_every_stream_every_step = False

    def __init__(self, spec: PlanSpec):
        super().__init__(spec)
        self.params: EntropySwitchParams = spec.params
        self._state = entropy_switch.SwitchState(active=self.params.start)
        self._folded = 0  # positions whose records `_state` has applied

    def _active_at(self, position: int) -> str:
        """The model that writes `position`: the start model, then the rule applied to the records before it."""
        if position < self._folded:  # a position fused again (vLLM's partial prefills): replay from the start
            self._state, self._folded = entropy_switch.SwitchState(active=self.params.start), 0
        p = self.params
        while self._folded < position:
            record = self._records.get(self._folded)
            if record is not None:
                entropy_switch.advance(self._state, record[1], self.spec.threshold, p.window, p.min_span)
            self._folded += 1
        return self._state.active

    def needs_base(self, position):
        return self._active_at(position) == entropy_switch.LARGE

    def streams_at(self, position):
        return () if self.needs_base(position) else (0,)

    def fuse(self, base, streams, position):
        """Scores: the active model's logits as they are. Record: (large wrote it, entropy, rolling mean)."""
        row = base if self.needs_base(position) else streams[0]
        return row, self._record(position, float(entropy_switch.entropy_bits(row)))

    @classmethod
    def step_rows(cls, plans, base, streams, positions):
        """The entropies of all rows in one call."""
        large = [plan.needs_base(position) for plan, position in zip(plans, positions)]
        rows = torch.stack([base[i] if large[i] else streams[i][0] for i in range(len(plans))]) if plans else base
        for plan, position, entropy in zip(plans, positions, entropy_switch.entropy_bits(rows).tolist()):
            plan._records[position] = plan._record(position, entropy)
        return rows.float()

    def _record(self, position: int, entropy: float) -> tuple[bool, float, float]:
        """The record of the step at `position` (its state is the one `_active_at(position)` folded to)."""
        state = self._state
        return (state.active == entropy_switch.LARGE, entropy,
                entropy_switch.rolling_mean(state.window, entropy, self.params.window))

    def report(self):
        records = self.records()
        last_ran = {True: 0, False: 0}  # per model (large?): the position after its last written token
        catch_up = {True: 0, False: 0}
        for position, (large, _, _) in enumerate(records):
            if position == 0 or records[position - 1][0] != large:  # an activation
                catch_up[large] += position - last_ran[large]
            last_ran[large] = position + 1
        return EntropySwitchReport(
            small=self.spec.guide, threshold=self.spec.threshold, steps=len(records),
            large_tokens=sum(r[0] for r in records),
            switches=sum(a[0] != b[0] for a, b in zip(records, records[1:])),
            small_catch_up_tokens=catch_up[False], large_catch_up_tokens=catch_up[True],
            parameter_ratio=self.spec.parameter_ratio,
            trace=[EntropySwitchStep(*r) for r in records] if self.params.trace else [])
