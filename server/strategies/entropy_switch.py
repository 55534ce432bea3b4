"""Entropy-adaptive model switching in the strategy layer: protobuf ↔ params and report, availability, plan.

The rule is decoding/entropy_switch.py; the per-step plan is decoding/plans.py's EntropySwitchPlan. The base model
is the large one; the small one is a guide (role `small`), stepped only where it writes.
"""

from __future__ import annotations

from chorus.v1 import decoding_pb2 as pb
from decoding import entropy_switch
from decoding.errors import InvalidArgument
from decoding.plans import EntropySwitchPlan, PlanSpec
from decoding.strategies import EntropySwitchParams, EntropySwitchReport
from server.config import GroupSpec
from server.errors import FailedPrecondition
from server.strategies.context import PlanContext, needs_role
from server.strategies.protobuf import enum_choice, optionals

NO_THRESHOLD = ("entropy switching needs a threshold: send `entropy_switch.threshold`, or set `entropy_threshold` "
                "in the group's config (`chorus calibrate-entropy` prints one)")
_STARTS = {pb.EntropySwitch.START_UNSPECIFIED: "small", pb.EntropySwitch.START_SMALL: "small",
           pb.EntropySwitch.START_LARGE: "large"}


def from_proto(p: pb.EntropySwitch) -> EntropySwitchParams:
    return EntropySwitchParams(small=p.small, start=enum_choice(_STARTS, p.start, "entropy_switch.start"), trace=p.trace,
                               **optionals(p, ("threshold", "window", "min_span"))).validate()


def report_to_proto(report: EntropySwitchReport) -> pb.EntropySwitchReport:
    return pb.EntropySwitchReport(
        small=report.small, threshold=report.threshold, steps=report.steps, large_tokens=report.large_tokens,
        large_fraction=report.large_fraction, switches=report.switches,
        small_catch_up_tokens=report.small_catch_up_tokens, large_catch_up_tokens=report.large_catch_up_tokens,
        parameter_ratio=report.parameter_ratio,
        compute_saved=entropy_switch.compute_saved(report.large_fraction, report.parameter_ratio),
        trace=[pb.EntropySwitchStep(large=s.large, entropy=s.entropy, rolling_entropy=s.rolling_entropy)
               for s in report.trace])


def availability(group: GroupSpec) -> str | None:
    """With default knobs the group needs a `small` guide and a calibrated threshold."""
    return (needs_role(group, "small", "entropy switching")
            or (None if group.entropy_threshold is not None else NO_THRESHOLD))


def resolve(ctx: PlanContext, request, p: EntropySwitchParams, prompt_ids: list[int]) -> PlanSpec:
    """Streams [the small model on the prompt]; the threshold is the request's or the group's default."""
    small = ctx.guide("entropy_switch.small", p.small, "small", "entropy switching")
    stream = ctx.stream(request, small, prompt_ids)
    if stream.model is None:
        raise InvalidArgument("entropy_switch.small", f"guide {small.name!r} is the base model itself on the same "
                                                      "prompt; the small model must be another model")
    threshold = p.threshold if p.threshold is not None else ctx.group.entropy_threshold
    if threshold is None:
        raise FailedPrecondition(NO_THRESHOLD)
    ratio = ctx.parameters(small.model) / ctx.parameters(ctx.group.base)
    return PlanSpec(plan=EntropySwitchPlan, params=p, streams=(stream,), guide=small.name, threshold=threshold,
                    parameter_ratio=ratio)
