"""Contrastive decoding (CD, USCD, STEER) in the strategy layer: protobuf ↔ params and report, availability, plan.

The math is decoding/contrastive.py; the per-step plan is decoding/plans.py's ContrastivePlan.
"""

from __future__ import annotations

from chorus.v1 import decoding_pb2 as pb
from decoding.errors import InvalidArgument
from decoding.plans import ContrastivePlan, PlanSpec, StreamSpec
from decoding.strategies import ContrastiveParams, ContrastiveReport, Context
from server.config import GroupSpec
from server.strategies.context import PlanContext, needs_role
from server.strategies.protobuf import chat_messages, enum_choice, optionals

_MODES = {pb.ContrastiveDecoding.MODE_UNSPECIFIED: "cd", pb.ContrastiveDecoding.MODE_CD: "cd",
          pb.ContrastiveDecoding.MODE_USCD: "uscd", pb.ContrastiveDecoding.MODE_STEER: "steer"}


def from_proto(p: pb.ContrastiveDecoding) -> ContrastiveParams:
    context = Context(prompt=p.contrast_context.prompt or None, messages=chat_messages(p.contrast_context.messages))
    if context.prompt and context.messages:
        raise InvalidArgument("contrastive.contrast_context", "give either prompt or messages, not both")
    return ContrastiveParams(mode=enum_choice(_MODES, p.mode, "contrastive.mode"), guide=p.guide, contrast_context=context, **optionals(p, (
        "alpha", "beta", "amateur_temperature", "uncertainty_threshold", "uscd_eta", "standard_weight",
        "lame_weight", "gamma", "eta"))).validate()


def report_to_proto(report: ContrastiveReport) -> pb.ContrastiveReport:
    return pb.ContrastiveReport(mode=report.mode, guide=report.guide, steps=report.steps,
                                contrasted_steps=report.contrasted_steps)


def availability(group: GroupSpec) -> str | None:
    """With default knobs (mode cd) the group needs an amateur."""
    return needs_role(group, "amateur", "contrastive decoding (mode cd)")


def resolve(ctx: PlanContext, request, p: ContrastiveParams, prompt_ids: list[int]) -> PlanSpec:
    """cd: [amateur on the prompt]; uscd: [base on the lame prompt]; steer: [B on the prompt, base on the negative
    context]."""
    base = ctx.group.base
    if p.mode == "uscd":
        lame = ctx.context_ids(request, p.contrast_context, "contrastive.contrast_context")
        return PlanSpec(plan=ContrastivePlan, params=p, streams=(StreamSpec(base, tuple(lame)),), guide=base)
    role = "amateur" if p.mode == "cd" else "small_base"
    guide = ctx.guide("contrastive.guide", p.guide, role, f"contrastive decoding (mode {p.mode})")
    weak = ctx.stream(request, guide, prompt_ids)
    if p.mode == "cd":
        return PlanSpec(plan=ContrastivePlan, params=p, streams=(weak,), guide=guide.name)
    negative = ctx.context_ids(request, p.contrast_context, "contrastive.contrast_context")
    return PlanSpec(plan=ContrastivePlan, params=p, streams=(weak, StreamSpec(base, tuple(negative))),
                    guide=guide.name)
