"""The one registry of strategies: nothing else dispatches on strategy types.

An entry names a strategy by its field in the API's `GenerateRequest.strategy` oneof (the same name as its
`StrategyReport` field) and gives:
  - `kind`: TOKEN_LEVEL (a per-request plan fuses next-token scores each step; the engine steps the plan's streams
    in lock-step) or REQUEST_LEVEL (an async program over whole sequences inside the group's replica);
  - `params_type`, `from_proto` (the validated params of the request's message) and `report_to_proto`;
  - `availability(group)`: None when the group's config serves the strategy with default knobs, else why not (what
    ListModels says, and the FAILED_PRECONDITION message);
  - `prepare(ctx)`: what the strategy makes of the group's config once, when an engine starts (optional);
  - `resolve(ctx, request, params, prompt_ids)`: the PlanSpec of a token-level request;
  - `run(engine, group, request, params)`: a request-level strategy's program, an async iterator of chunks (it may
    stream progress chunks, converted by `progress_to_proto`).
Adding a strategy: its math (and plan) in decoding/, its message in the proto, a module here with those functions,
and one entry below. A oneof field with no entry answers UNIMPLEMENTED naming it.
"""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Callable

from decoding.plans import PlanSpec
from decoding.strategies import (BestOfNParams, ContrastiveParams, EntropySwitchParams, LogitFusionParams,
                                 RefusalSteeringParams)
from server.config import GroupSpec, ModelSpec
from server.engines.base import Engine, GenerationChunk, GenerationRequest
from server.errors import Unimplemented
from server.strategies import best_of_n, contrastive, entropy_switch, logit_fusion, refusal
from server.strategies.context import PlanContext

TOKEN_LEVEL = "token"
REQUEST_LEVEL = "request"


@dataclasses.dataclass(frozen=True)
class Strategy:
    field: str
    kind: str
    params_type: type
    from_proto: Callable[[object], object]
    report_to_proto: Callable[[object], object]
    availability: Callable[[GroupSpec], str | None]
    resolve: Callable[[PlanContext, GenerationRequest, object, list[int]], PlanSpec] | None = None
    prepare: Callable[[PlanContext], object] | None = None
    run: Callable[[Engine, GroupSpec, GenerationRequest, object], AsyncIterator[GenerationChunk]] | None = None
    progress_to_proto: Callable[[object], object] | None = None


REGISTRY: dict[str, Strategy] = {s.field: s for s in (
    Strategy("contrastive", TOKEN_LEVEL, ContrastiveParams, contrastive.from_proto,
             contrastive.report_to_proto, contrastive.availability, contrastive.resolve),
    Strategy("logit_fusion", TOKEN_LEVEL, LogitFusionParams, logit_fusion.from_proto,
             logit_fusion.report_to_proto, logit_fusion.availability, logit_fusion.resolve),
    Strategy("refusal_steering", TOKEN_LEVEL, RefusalSteeringParams, refusal.from_proto,
             refusal.report_to_proto, refusal.availability, refusal.resolve, prepare=refusal.prepare),
    Strategy("entropy_switch", TOKEN_LEVEL, EntropySwitchParams, entropy_switch.from_proto,
             entropy_switch.report_to_proto, entropy_switch.availability, entropy_switch.resolve),
)}


def _candidates_from_proto(field: str, message) -> object:
    """Best-of-N's `candidates` oneof: a token-level strategy's message (its field named as in the strategy oneof)
    as that strategy's params."""
    return REGISTRY[field].from_proto(message)


REGISTRY["best_of_n"] = Strategy(
    "best_of_n", REQUEST_LEVEL, BestOfNParams, lambda p: best_of_n.from_proto(p, _candidates_from_proto),
    best_of_n.report_to_proto, best_of_n.availability, run=best_of_n.run,
    progress_to_proto=best_of_n.progress_to_proto)
_BY_PARAMS = {s.params_type: s for s in REGISTRY.values()}


def strategy(field: str) -> Strategy:
    """The entry of a oneof field; UNIMPLEMENTED for a field the API declares and nothing here serves."""
    entry = REGISTRY.get(field)
    if entry is None:
        raise Unimplemented(f"strategy {field!r} is declared in the API but not implemented yet")
    return entry


def strategy_of(params) -> Strategy:
    """The entry whose params a request carries."""
    entry = _BY_PARAMS.get(type(params))
    if entry is None:
        raise Unimplemented(f"no registered strategy takes {type(params).__name__}")
    return entry


def availability(group: GroupSpec) -> dict[str, str | None]:
    """Per registered strategy: None when the group's config serves it with default knobs, else why not."""
    return {field: entry.availability(group) for field, entry in REGISTRY.items()}


def generate(engine: Engine, group: GroupSpec, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
    """A request's chunks: a request-level strategy's program over the engine, else the engine's own generation
    (plain, or a token-level plan it steps)."""
    if request.strategy is not None:
        entry = strategy_of(request.strategy)
        if entry.kind == REQUEST_LEVEL:
            return entry.run(engine, group, request, request.strategy)
    return engine.generate(request)


class PlanResolver:
    """Turns a request's token-level strategy into a PlanSpec for one group, with the group's tokenizer."""

    def __init__(self, group: GroupSpec, tokenizer, max_model_len: int, models: dict[str, ModelSpec]):
        self.context = PlanContext(group, tokenizer, max_model_len, models)
        for field, entry in REGISTRY.items():
            if entry.prepare is not None:
                self.context.prepared[field] = entry.prepare(self.context)

    def resolve(self, request: GenerationRequest, prompt_ids: list[int]) -> PlanSpec | None:
        if request.strategy is None:
            return None
        entry = strategy_of(request.strategy)
        if entry.kind != TOKEN_LEVEL:
            raise Unimplemented(f"strategy {entry.field!r} is request-level; engines step token-level plans only")
        return entry.resolve(self.context, request, request.strategy, prompt_ids)
