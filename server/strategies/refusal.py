"""Refusal steering in the strategy layer: protobuf ↔ params and report, availability, marker ids, plan.

The decision math is decoding/refusal.py; the plan is decoding/plans.py's RefusalPlan.
"""

from __future__ import annotations

from chorus.v1 import decoding_pb2 as pb
from decoding.errors import InvalidArgument
from decoding.plans import PlanSpec, RefusalPlan
from decoding.refusal import RefusalMarkers, RefusalParams, validate_params
from decoding.strategies import RefusalReport, RefusalSteeringParams
from server.config import GroupSpec, RefusalSpec
from server.errors import ConfigError, FailedPrecondition
from server.strategies.context import PlanContext
from server.strategies.protobuf import enum_choice, optionals

NO_REFUSAL_CONFIG = ("refusal steering needs refusal tokens or prefixes: the model's group config declares none "
                     "(set `refusal` there, or send refusal_prefixes with the request)")
_MODES = {pb.RefusalSteering.MODE_UNSPECIFIED: "argmax", pb.RefusalSteering.MODE_ARGMAX: "argmax",
          pb.RefusalSteering.MODE_THRESHOLD: "threshold", pb.RefusalSteering.MODE_LOGIT_BIAS: "logit_bias"}


def from_proto(p: pb.RefusalSteering) -> RefusalSteeringParams:
    decision = RefusalParams(mode=enum_choice(_MODES, p.mode, "refusal_steering.mode"), thresholds=dict(p.thresholds), biases=dict(p.biases),
                             controlled=tuple(p.categories),
                             **optionals(p, ("threshold", "bias", "softmax_temperature")))
    return RefusalSteeringParams(decision=decision, prefixes=tuple((x.category, x.text) for x in p.refusal_prefixes))


def report_to_proto(report: RefusalReport) -> pb.RefusalReport:
    return pb.RefusalReport(decision=report.action, category=report.category or "",
                            probabilities=report.probabilities, respond_probability=report.respond_probability,
                            forced_token_ids=report.forced_token_ids)


def availability(group: GroupSpec) -> str | None:
    return None if group.refusal else NO_REFUSAL_CONFIG


def prepare(ctx: PlanContext) -> RefusalMarkers | None:
    """The marker ids of the group's refusal config (checked once, when the engine starts), or None."""
    return refusal_markers(ctx.tokenizer, ctx.group.refusal) if ctx.group.refusal else None


def resolve(ctx: PlanContext, request, p: RefusalSteeringParams, prompt_ids: list[int]) -> PlanSpec:
    """No extra streams: the plan decides at the first step from the base's own logits."""
    markers = refusal_markers(ctx.tokenizer, None, p.prefixes) if p.prefixes else ctx.prepared["refusal_steering"]
    if markers is None:
        raise FailedPrecondition(NO_REFUSAL_CONFIG)
    validate_params(p.decision, markers)
    return PlanSpec(plan=RefusalPlan, params=p, markers=markers)


def refusal_markers(tokenizer, spec: RefusalSpec | None, request_prefixes: tuple[tuple[str, str], ...] = ()
                    ) -> RefusalMarkers:
    """Marker token ids: single refusal tokens (token mode) or the token ids of each reply prefix (prefix mode)."""
    if request_prefixes:
        categories: dict[str, list[tuple[int, ...]]] = {}
        for i, (category, text) in enumerate(request_prefixes):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if not category or not ids:
                raise InvalidArgument(f"refusal_steering.refusal_prefixes[{i}]", "needs a category and a non-empty text")
            categories.setdefault(category, []).append(ids)
        markers = RefusalMarkers(categories={c: tuple(v) for c, v in categories.items()}, respond_id=None)
    elif spec is None:
        raise FailedPrecondition(NO_REFUSAL_CONFIG)
    elif spec.tokens is not None:
        markers = RefusalMarkers(
            categories={c: ((_single_token_id(tokenizer, t),),) for c, t in spec.tokens.items()},
            respond_id=_single_token_id(tokenizer, spec.respond_token))
    else:
        markers = RefusalMarkers(categories={
            c: tuple(tuple(tokenizer.encode(p, add_special_tokens=False)) for p in prefixes)
            for c, prefixes in spec.prefixes.items()}, respond_id=None)
    try:
        markers.validate()
    except ValueError as error:
        if request_prefixes:
            raise InvalidArgument("refusal_steering.refusal_prefixes", str(error)) from None
        raise ConfigError(f"refusal: {error}") from None
    return markers


def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"refusal token {token!r} is {len(ids)} tokens in this tokenizer; markers must be single "
                          f"added tokens (a model trained with refusal tokens)")
    return ids[0]
