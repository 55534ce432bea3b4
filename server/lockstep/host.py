"""The lock-step host: every stream of every hosted request stepped together, then each request's plan fuses its rows.

One host serves both engines, keyed by an opaque request key:
  - the transformers engine hosts the base model too: a request's base stream is the base model on its prompt;
  - the vLLM logits processors host the guide models only: the base's logits are vLLM's, handed in per row, and so
    are the logits of the streams that run as vLLM companion requests (`external`: the base model on another
    context as rows of vLLM's own batch, server/engines/vllm_companions.py).

    add(key, spec, base_context=None, generated=(), prefill_now=True, external=())
        open the request's streams (one KV slot each) and prefill them with their contexts (plus `generated`, when a
        preempted vLLM request comes back); with `base_context`, a base stream on the host's base model too; the
        plan streams listed in `external` take no slot: the caller hands in their logits at every step; nor does
        a stream on an early-exit view of the base (`exits`) on `base_context` in a plan that reads every stream
        at every step: its logits are the view's head on the base stream's hidden state after the view's last
        layer (`ModelRunner.exit_layers`), so it costs a head, not a forward (contrastive decoding's early-exit
        amateur; Gera et al. 2023 contrast layers of one forward the same way)
    prefill(budget) -> ready keys
        with prefill_now=False, the contexts are fed in chunks instead, at most `budget` tokens a call, the chunks
        of all newcomers in one forward per model, so a long prompt never stalls the running sequences for long
    step([(key, generated), ...], base_logits=None, external_logits=None) -> scores [N, V]
        for each request, the plan's fused next-token scores after `generated` (a forced token is one-hot: 0 on it,
        −inf elsewhere); `base_logits` [N, ≥V] are the caller's base rows for requests without a base stream,
        `external_logits[i][j]` the row of plan stream j of request i when that stream is external
    fuse(logits, [(key, row, generated), ...])
        the same, written into the rows of vLLM's logits in place
    remove(key)
        free the streams (a vLLM request's plan is parked, a bounded number of them, in case vLLM preempted it and
        adds it back, so a refusal decision and the report's records survive)

Stepping: a stream is fed the tokens generated since it last ran. A stream its plan does not read at the first
position (`lazy`: entropy switching's idle model) is not prefilled; its first use feeds its context and every token
generated so far in one extend. Streams one token behind decode together, one batched forward per model across all
requests; a stream several tokens behind (a position its plan skipped, see `Plan.needs_base` / `Plan.streams_at`,
or a request vLLM did not schedule) catches up in a multi-token extend, its KV cache kept, all such streams of a
model in ragged forwards (split by length where padding would cost more than a forward: `padding_groups`). A
request stepped again at the same position (vLLM fuses rows of partial prefills and discards their tokens) reuses
its streams' logits. Plans of one class fuse their rows in one call (`Plan.step_rows`).

Capacity is checked here for both engines: `unservable` says why a request could never be hosted (more slots on a
model than it has: FAILED_PRECONDITION), `fits` whether its slots are free now (the transformers engine keeps the
request waiting until they are).
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
"""(request key, position, the plan's record of that step, the request's forward passes per hosted model so far)."""


def exit_streams(spec: PlanSpec | None, base_context: Sequence[int] | None, exits: dict[str, int]) -> set[int]:
    """The plan streams a host with early-exit views `exits` reads from the base's forward: streams on those views
    on the base's own context, in a plan that reads every stream at every step (the base's forward then runs
    wherever they are read)."""
    if spec is None or base_context is None or not spec.plan.reads_every_stream_every_step:
        return set()
    context = tuple(base_context)
    return {i for i, s in enumerate(spec.streams) if s.model in exits and s.ids == context}


@dataclasses.dataclass
class StepRecords:
    """What a sink received for one request: the plan's record per fused position (a position fused again replaces
    its record) and the latest forward-pass counts of its hosted models."""
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
class _Stream:
    """One model on one context, fed the request's generated tokens."""
    model: str
    slot: Slot
    fed: int  # generated tokens in its KV cache (after its context)
    logits: torch.Tensor | None  # next-token logits after its context + generated[:fed]; None while prefilling
    todo: list[int] = dataclasses.field(default_factory=list)  # context tokens not yet in its KV cache
    # Not read at the request's first position: its context is fed with the generated tokens when first needed.
    lazy: bool = False


@dataclasses.dataclass(eq=False)
class _ExternalStream:
    """A plan stream the caller runs (a vLLM companion request): no slot here, its logits handed in each step."""
    model: str
    logits: torch.Tensor | None = None


@dataclasses.dataclass(eq=False)
class _ExitStream:
    """A plan stream on an early-exit view of the base model on the base stream's context: no slot; each step its
    logits are the view's head on the base stream's hidden state after `layer` (equal to the view's own forward)."""
    model: str
    layer: int
    logits: torch.Tensor | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    plan: Plan | None
    base: _Stream | None  # None: the caller hands in the base's logits
    # Per plan stream: its own stream, or None where the plan reuses the base's logits (the base on the prompt), an
    # external one the caller runs, or an early-exit view read from the base's forward.
    streams: list[_Stream | _ExternalStream | _ExitStream | None]
    forward_passes: collections.Counter

    def own_streams(self) -> list[_Stream]:
        return [s for s in (self.base, *self.streams) if isinstance(s, _Stream)]


class LockstepHost:
    # Plans of removed vLLM requests kept for a possible return after preemption (oldest dropped first).
    PARKED_PLANS = 1024

    def __init__(self, runners: dict[str, ModelRunner], vocab_size: int, sink: ReportSink | None = None,
                 base_model: str | None = None, exits: dict[str, int] | None = None):
        """`runners`: one per hosted model; `base_model`: the one base streams run on (the transformers engine);
        `sink`: where each fused step's record goes (the vLLM processors); `exits`: the hosted models that are
        early-exit views of the base model (name → its layer count), each layer one the base's runner keeps
        (`exit_layers`)."""
        exits = exits or {}
        for name, layer in exits.items():
            if base_model is None or layer not in runners[base_model].exit_layers:
                raise ValueError(f"early-exit model {name!r}: the base model's runner does not keep layer {layer}")
        self.runners = runners
        self.base_model = base_model
        self.exits = exits
        self.vocab_size = vocab_size
        self._sink = sink
        self._requests: dict[str, _Request] = {}
        self._prefilling: dict[str, _Request] = {}  # requests added with a deferred prefill, oldest first
        self._parked: collections.OrderedDict[str, tuple[Plan, collections.Counter]] = collections.OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._requests

    # ---- capacity ----

    def slots_needed(self, spec: PlanSpec | None, base_context: Sequence[int] | None = None,
                     external: Sequence[int] = ()) -> collections.Counter:
        """KV slots per model a request takes: its base stream (with a `base_context`) and each stream on a model
        that is neither `external` nor read from the base's forward."""
        need = collections.Counter([self.base_model] if base_context is not None else [])
        exits = exit_streams(spec, base_context, self.exits)
        need.update(s.model for i, s in enumerate(spec.streams if spec else ())
                    if s.model is not None and i not in external and i not in exits)
        return need

    def unservable(self, need: collections.Counter) -> str | None:
        """Why a request needing `need` slots could never be hosted, or None."""
        for name, n in need.items():
            if name not in self.runners:
                return f"model {name!r} is not hosted here"
            if n > self.runners[name].cache.num_slots:
                return (f"this request needs {n} KV-cache slots on model {name!r}; the group has "
                        f"{self.runners[name].cache.num_slots} (max_batch_size)")
        return None

    def fits(self, need: collections.Counter) -> bool:
        return all(self.runners[name].free_slots >= n for name, n in need.items())

    # ---- requests ----

    def add(self, key: str, spec: PlanSpec | None, *, base_context: Sequence[int] | None = None,
            generated: Sequence[int] = (), prefill_now: bool = True, external: Sequence[int] = ()) -> None:
        """Opens the request's streams and prefills them now, or with `prefill_now=False` in chunks over later
        `prefill` calls (the request is stepped only once `prefill` has reported it ready). The plan streams in
        `external` are the caller's: `step` reads their logits from its `external_logits`."""
        need = self.slots_needed(spec, base_context, external)
        why = self.unservable(need)
        if why is None and not self.fits(need):
            why = "; ".join(f"model {n!r} has {self.runners[n].free_slots} free KV slots, the request needs {k}"
                            for n, k in need.items() if self.runners[n].free_slots < k)
        if why:
            raise RuntimeError(why)
        if key in self._requests:
            self.remove(key)
        plan, passes = self._parked.pop(key, None) or (spec.build() if spec else None, collections.Counter())
        request = _Request(plan=plan, base=None, streams=[], forward_passes=passes)
        position = len(generated)
        first = set(plan.streams_at(position)) if plan is not None else None
        if base_context is not None:
            request.base = self._open(request, self.base_model, base_context, generated, prefill_now,
                                      lazy=plan is not None and not plan.needs_base(position))
        exits = exit_streams(spec, base_context, self.exits)
        for i, stream in enumerate(spec.streams if spec else ()):
            if i in external:
                request.streams.append(_ExternalStream(stream.model))
                continue
            if i in exits:
                request.streams.append(_ExitStream(stream.model, self.exits[stream.model]))
                continue
            request.streams.append(None if stream.model is None else
                                   self._open(request, stream.model, stream.ids, generated, prefill_now,
                                              lazy=i not in first))
        self._requests[key] = request
        if not prefill_now:
            self._prefilling[key] = request

    def _open(self, request: _Request, model: str, context: Sequence[int], generated: Sequence[int],
              prefill_now: bool, lazy: bool) -> _Stream:
        """A stream in a KV slot of `model`; a `lazy` one (its plan does not read it at the first position) is fed its
        context with the tokens generated so far when its plan first reads it (entropy switching's idle model)."""
        runner = self.runners[model]
        stream = _Stream(model=model, slot=runner.open(), fed=len(generated), logits=None,
                         todo=[*context, *generated], lazy=lazy)
        if prefill_now and not lazy:
            request.forward_passes[model] += 1
            stream.logits, stream.todo = runner.extend(stream.slot, stream.todo), []
        return stream

    def prefill(self, budget: int) -> list[str]:
        """Feeds deferred prefills, oldest request first: at most `budget` context tokens in all, cut into chunks,
        one forward per model for the chunks of every request (ragged rows). Returns the keys of the requests whose
        every stream is now prefilled, in the order they were added."""
        work: dict[str, list[tuple[_Stream, list[int]]]] = collections.defaultdict(list)
        for request in self._prefilling.values():
            for stream in request.own_streams():
                if stream.todo and not stream.lazy and budget > 0:
                    chunk = stream.todo[:budget]
                    budget -= len(chunk)
                    work[stream.model].append((stream, chunk))
                    request.forward_passes[stream.model] += 1
            if budget <= 0:
                break
        for model, chunks in work.items():
            logits = self.runners[model].extend_many([stream.slot for stream, _ in chunks], [c for _, c in chunks])
            for (stream, chunk), row in zip(chunks, logits):
                stream.todo = stream.todo[len(chunk):]
                stream.logits = None if stream.todo else row
        ready = [key for key, request in self._prefilling.items()
                 if not any(stream.todo and not stream.lazy for stream in request.own_streams())]
        for key in ready:
            del self._prefilling[key]
        return ready

    def fork(self, key: str, new_key: str) -> None:
        """A second request on a copy of a plain request's base stream (its KV row copied, no forward): sample_n's
        samples share one prefill of their prompt."""
        source = self._requests[key]
        if source.plan is not None or source.base is None:
            raise ValueError("only a plain request with a base stream forks")
        runner = self.runners[source.base.model]
        base = _Stream(model=source.base.model, slot=runner.fork(source.base.slot), fed=source.base.fed,
                       logits=source.base.logits)
        self._requests[new_key] = _Request(plan=None, base=base, streams=[], forward_passes=collections.Counter())

    def remove(self, key: str, park: bool = True) -> None:
        request = self._requests.pop(key, None)
        if request is None:
            return
        self._prefilling.pop(key, None)
        for stream in request.own_streams():
            self.runners[stream.model].close(stream.slot)
        if park and request.plan is not None:
            self._parked[key] = (request.plan, request.forward_passes)
            while len(self._parked) > self.PARKED_PLANS:
                self._parked.popitem(last=False)

    def plan(self, key: str) -> Plan | None:
        return self._requests[key].plan

    def forward_passes(self, key: str) -> dict[str, int]:
        return dict(self._requests[key].forward_passes)

    # ---- stepping ----

    def step(self, rows: Sequence[tuple[str, Sequence[int]]], base_logits: torch.Tensor | None = None,
             external_logits: Sequence[dict[int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Fused scores [len(rows), V] (float32) for each (key, generated tokens so far); see the module docstring."""
        requests = [self._requests[key] for key, _ in rows]
        for i, request in enumerate(requests):
            for j, stream in enumerate(request.streams):
                if isinstance(stream, _ExternalStream):
                    if external_logits is None or j not in external_logits[i]:
                        raise ValueError(f"request {rows[i][0]!r}: no logits handed in for its external stream {j}")
                    stream.logits = external_logits[i][j][:self.vocab_size].float()
        positions = [len(generated) for _, generated in rows]
        needed = [self._needed(request, position) for request, position in zip(requests, positions)]
        self._feed([(request, stream, generated) for request, streams, (_, generated) in zip(requests, needed, rows)
                    for stream in streams])
        self._read_exits(requests, positions)
        vocab = self.vocab_size
        # A base its plan does not read here may never have run (lazy): NaN, which no plan reads.
        base = torch.stack([
            (request.base.logits if request.base.logits is not None else torch.full((vocab,), float("nan")))
            if request.base is not None
            else base_logits[i, :vocab].float() if base_logits is not None
            else torch.full((vocab,), float("nan"))
            for i, request in enumerate(requests)]) if requests else torch.empty((0, vocab))
        scores = base.clone()
        by_class: dict[type, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(requests):
            if request.plan is not None:
                by_class[type(request.plan)].append(i)
        for plan_class, members in by_class.items():
            plans = [requests[i].plan for i in members]
            streams = [self._stream_rows(requests[i], base[i], positions[i]) for i in members]
            fused = plan_class.step_rows(plans, base[members], streams, [positions[i] for i in members])
            scores[members] = fused
        for i, ((key, _), request) in enumerate(zip(rows, requests)):
            if request.plan is None:
                continue
            scores[i] = request.plan.forcing(scores[i], positions[i])
            if self._sink is not None:
                self._sink(key, positions[i], request.plan.record(positions[i]), dict(request.forward_passes))
        for request in requests:  # the caller's rows (a view of vLLM's logits) are not kept past the step
            for stream in request.streams:
                if isinstance(stream, _ExternalStream):
                    stream.logits = None
        return scores

    def fuse(self, logits: torch.Tensor, rows: Sequence[tuple[str, int, Sequence[int]]]) -> None:
        """`step` for the vLLM processors: rewrites `logits[row]` in place for each (key, row, generated) (rows past
        the real vocabulary, vLLM's padding, become −inf)."""
        if not rows:
            return
        index = [row for _, row, _ in rows]
        scores = self.step([(key, generated) for key, _, generated in rows], logits[index])
        logits[index, :self.vocab_size] = scores.to(logits.dtype)
        logits[index, self.vocab_size:] = float("-inf")

    def _needed(self, request: _Request, position: int) -> list[_Stream]:
        """The request's own streams that its plan reads at `position`."""
        plan = request.plan
        needed = [request.base] if request.base is not None and (plan is None or plan.needs_base(position)) else []
        if plan is not None:
            needed += [request.streams[i] for i in plan.streams_at(position) if isinstance(request.streams[i], _Stream)]
        return needed

    def _feed(self, work: list[tuple[_Request, _Stream, Sequence[int]]]) -> None:
        """Brings each stream up to its request's generated tokens: one batched decode per model for streams one
        token behind, one ragged extend per model for the streams further behind (catch-ups); streams already there
        keep their logits."""
        one_step = []
        behind: dict[str, list[tuple[_Stream, list[int]]]] = collections.defaultdict(list)
        for request, stream, generated in work:
            missing = [*stream.todo, *generated[stream.fed:]]  # a lazy stream's context comes first
            if not missing:
                continue
            request.forward_passes[stream.model] += 1
            stream.fed, stream.todo, stream.lazy = len(generated), [], False
            if len(missing) == 1:
                one_step.append((stream, missing[0]))
            else:
                behind[stream.model].append((stream, missing))
        for model, streams in behind.items():
            logits = self.runners[model].extend_many([s.slot for s, _ in streams], [tokens for _, tokens in streams])
            for (stream, _), row in zip(streams, logits):
                stream.logits = row
        decoded = decode_streams(self.runners, [(s.model, s.slot, token) for s, token in one_step])
        for (stream, _), logits in zip(one_step, decoded):
            stream.logits = logits

    def _read_exits(self, requests: Sequence[_Request], positions: Sequence[int]) -> None:
        """The logits of the early-exit streams read at these positions: one head call per view model over the exit
        states of their base streams (fed up to the position just before). Each counts a forward pass of its model:
        its layers ran inside the base's forward."""
        reads: dict[str, list[tuple[_Request, _ExitStream]]] = collections.defaultdict(list)
        for request, position in zip(requests, positions):
            for i in request.plan.streams_at(position) if request.plan is not None else ():
                stream = request.streams[i]
                if isinstance(stream, _ExitStream):
                    reads[stream.model].append((request, stream))
        for model, members in reads.items():
            hidden = torch.stack([request.base.slot.exit_states[stream.layer] for request, stream in members])
            for (request, stream), logits in zip(members, self.runners[model].head(hidden)):
                stream.logits = logits
                request.forward_passes[model] += 1

    @staticmethod
    def _stream_rows(request: _Request, base: torch.Tensor, position: int) -> torch.Tensor:
        """The rows the plan's step reads: its needed extra streams in order (the base row for a reused one)."""
        chosen = request.plan.streams_at(position)
        if not chosen:
            return base.new_empty((0, base.shape[-1]))
        return torch.stack([base if request.streams[i] is None else request.streams[i].logits for i in chosen])
