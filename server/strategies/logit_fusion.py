"""Logit fusion (dynamic and static) in the strategy layer: protobuf ↔ params and report, availability, plan.

The math is decoding/logit_fusion.py; the per-step plan is decoding/plans.py's LogitFusionPlan.
"""

from __future__ import annotations

from chorus.v1 import decoding_pb2 as pb
from decoding.errors import InvalidArgument
from decoding.plans import LogitFusionPlan, PlanSpec
from decoding.strategies import LogitFusionParams, LogitFusionReport
from server.config import GroupSpec, GuideSpec
from server.errors import FailedPrecondition
from server.strategies.context import PlanContext, needs_role
from server.strategies.protobuf import enum_choice, optionals

_MODES = {pb.LogitFusion.MODE_UNSPECIFIED: "dynamic", pb.LogitFusion.MODE_DYNAMIC: "dynamic",
          pb.LogitFusion.MODE_STATIC: "static"}
NO_EXPERTS = "logit fusion needs at least one guide with role 'expert:<task>'"


def from_proto(p: pb.LogitFusion) -> LogitFusionParams:
    return LogitFusionParams(mode=enum_choice(_MODES, p.mode, "logit_fusion.mode"), experts=tuple(p.experts),
                             alphas=tuple(p.alphas), small_base=p.small_base, report_weights=p.report_weights,
                             **optionals(p, ("grid_max", "grid_step"))).validate()


def report_to_proto(report: LogitFusionReport) -> pb.LogitFusionReport:
    return pb.LogitFusionReport(mode=report.mode, small_base=report.small_base, experts=report.experts,
                                mean_weights=report.mean_weights,
                                steps=[pb.FusionWeights(alphas=w) for w in report.step_weights])


def availability(group: GroupSpec) -> str | None:
    return needs_role(group, "small_base", "logit fusion") or (None if _experts_of(group) else NO_EXPERTS)


def resolve(ctx: PlanContext, request, p: LogitFusionParams, prompt_ids: list[int]) -> PlanSpec:
    """Streams [small base S on the prompt, expert 1, ..., expert T] (each on its own in-context prompt)."""
    small = ctx.guide("logit_fusion.small_base", p.small_base, "small_base", "logit fusion")
    experts = _chosen_experts(ctx.group, p)
    if p.mode == "static" and len(p.alphas) not in (0, 1, len(experts)):
        raise InvalidArgument("logit_fusion.alphas", f"give one α for all experts or one per expert "
                                                     f"({len(experts)}), got {len(p.alphas)}")
    streams = (ctx.stream(request, small, prompt_ids), *(ctx.stream(request, e, prompt_ids) for e in experts))
    return PlanSpec(plan=LogitFusionPlan, params=p, streams=streams, guide=small.name,
                    experts=tuple(e.name for e in experts))


def _experts_of(group: GroupSpec) -> list[GuideSpec]:
    return [g for g in group.guides.values() if g.expert_tasks]


def _chosen_experts(group: GroupSpec, p: LogitFusionParams) -> list[GuideSpec]:
    """The experts the request names (by guide name or task), or every expert of the group."""
    all_experts = _experts_of(group)
    if not all_experts:
        raise FailedPrecondition(NO_EXPERTS)
    if not p.experts:
        return all_experts
    chosen = []
    for i, name in enumerate(p.experts):
        match = [g for g in all_experts if g.name == name or name in g.expert_tasks]
        if not match:
            known = sorted({g.name for g in all_experts} | {t for g in all_experts for t in g.expert_tasks})
            raise InvalidArgument(f"logit_fusion.experts[{i}]", f"unknown expert {name!r}; this model's experts: "
                                                                f"{known}")
        chosen.append(match[0])
    if len(set(g.name for g in chosen)) != len(chosen):
        raise InvalidArgument("logit_fusion.experts", "an expert is named twice")
    return chosen
