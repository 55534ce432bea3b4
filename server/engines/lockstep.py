"""From a request's strategy to a lock-step plan: which guide runs on which context, checked against the config.

Engine-neutral: the transformers engine steps the plan's streams on its own runners; the vLLM engine ships the
PlanSpec to its logits processor. Everything a request can get wrong is caught here, before any model work:
unknown guides (INVALID_ARGUMENT) and strategies the group's config cannot serve (FAILED_PRECONDITION, with the
same reason ListModels gives).
"""

from __future__ import annotations

import dataclasses

from decoding.errors import InvalidArgument
from decoding.plans import PlanSpec, StreamSpec
from decoding.refusal import RefusalMarkers, validate_params
from decoding.strategies import ContrastiveParams, Context, LogitFusionParams, RefusalSteeringParams, Strategy
from server.config import GroupSpec, GuideSpec, RefusalSpec
from server.engines.base import ChatMessage, GenerationRequest
from server.engines.prompts import render_prompt
from server.errors import ConfigError, FailedPrecondition

NO_REFUSAL_CONFIG = ("refusal steering needs refusal tokens or prefixes: the model's group config declares none "
                     "(set `refusal` there, or send refusal_prefixes with the request)")
STRATEGY_FIELDS = {ContrastiveParams: "contrastive", LogitFusionParams: "logit_fusion",
                   RefusalSteeringParams: "refusal_steering"}


def unavailable_reasons(group: GroupSpec) -> dict[str, str | None]:
    """For each token-level strategy: None when the group's config serves it with default knobs, else why not."""
    def needs(role: str, what: str) -> str | None:
        return None if group.guides_with_role(role) else f"{what} needs a guide with role {role!r} in the group's config"

    experts = [g for g in group.guides.values() if g.expert_tasks]
    return {
        "contrastive": needs("amateur", "contrastive decoding (mode cd)"),
        "logit_fusion": needs("small_base", "logit fusion") or (
            None if experts else "logit fusion needs at least one guide with role 'expert:<task>'"),
        "refusal_steering": None if group.refusal else NO_REFUSAL_CONFIG,
    }


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


class PlanResolver:
    """Turns a request's strategy into a PlanSpec for one group, with the group's tokenizer."""

    def __init__(self, group: GroupSpec, tokenizer, max_model_len: int):
        self.group = group
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._markers = refusal_markers(tokenizer, group.refusal) if group.refusal else None

    def resolve(self, request: GenerationRequest, prompt_ids: list[int]) -> PlanSpec | None:
        strategy: Strategy | None = request.strategy
        if strategy is None:
            return None
        if isinstance(strategy, ContrastiveParams):
            return self._contrastive(request, strategy, prompt_ids)
        if isinstance(strategy, LogitFusionParams):
            return self._fusion(request, strategy, prompt_ids)
        return self._refusal(strategy)

    # ---- contrastive: cd / uscd / steer ----

    def _contrastive(self, request, p: ContrastiveParams, prompt_ids) -> PlanSpec:
        if p.mode == "uscd":
            lame = self._context_ids(request, p.contrast_context, "contrastive.contrast_context")
            return PlanSpec(params=p, streams=(StreamSpec(self.group.base, tuple(lame)),), guide=self.group.base)
        role = "amateur" if p.mode == "cd" else "small_base"
        guide = self._guide("contrastive.guide", p.guide, role, f"contrastive decoding (mode {p.mode})")
        weak = self._stream(request, guide, prompt_ids)
        if p.mode == "cd":
            return PlanSpec(params=p, streams=(weak,), guide=guide.name)
        negative = self._context_ids(request, p.contrast_context, "contrastive.contrast_context")
        return PlanSpec(params=p, streams=(weak, StreamSpec(self.group.base, tuple(negative))), guide=guide.name)

    # ---- logit fusion: static / dynamic ----

    def _fusion(self, request, p: LogitFusionParams, prompt_ids) -> PlanSpec:
        small = self._guide("logit_fusion.small_base", p.small_base, "small_base", "logit fusion")
        experts = self._experts(p)
        if p.mode == "static" and len(p.alphas) not in (0, 1, len(experts)):
            raise InvalidArgument("logit_fusion.alphas", f"give one α for all experts or one per expert "
                                                         f"({len(experts)}), got {len(p.alphas)}")
        streams = (self._stream(request, small, prompt_ids),
                   *(self._stream(request, e, prompt_ids) for e in experts))
        return PlanSpec(params=p, streams=streams, guide=small.name, experts=tuple(e.name for e in experts))

    def _experts(self, p: LogitFusionParams) -> list[GuideSpec]:
        all_experts = [g for g in self.group.guides.values() if g.expert_tasks]
        if not all_experts:
            raise FailedPrecondition(unavailable_reasons(self.group)["logit_fusion"])
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

    # ---- refusal steering ----

    def _refusal(self, p: RefusalSteeringParams) -> PlanSpec:
        markers = refusal_markers(self.tokenizer, None, p.prefixes) if p.prefixes else self._markers
        if markers is None:
            raise FailedPrecondition(NO_REFUSAL_CONFIG)
        validate_params(p.decision, markers)
        return PlanSpec(params=p, markers=markers)

    # ---- helpers ----

    def _guide(self, field: str, name: str, role: str, what: str) -> GuideSpec:
        if name:
            if name not in self.group.guides:
                raise InvalidArgument(field, f"unknown guide {name!r}; this model's guides: {sorted(self.group.guides)}")
            return self.group.guides[name]
        candidates = self.group.guides_with_role(role)
        if not candidates:
            raise FailedPrecondition(f"{what} needs a guide with role {role!r}; the config of model "
                                     f"{self.group.base!r} declares none (guides: {sorted(self.group.guides) or 'none'})")
        return candidates[0]

    def _stream(self, request: GenerationRequest, guide: GuideSpec, prompt_ids: list[int]) -> StreamSpec:
        """The guide's stream on the request's prompt (with the guide's system prompt, for in-context experts).
        A guide that is the base model on the very same prompt reuses the base's logits (model None)."""
        ids = prompt_ids
        if guide.system_prompt:
            ids = self._ids(_with_system_prompt(request, guide.system_prompt), f"guides.{guide.name}")
        if guide.model == self.group.base and list(ids) == list(prompt_ids):
            return StreamSpec(None)
        return StreamSpec(guide.model, tuple(ids))

    def _context_ids(self, request, context: Context, field: str) -> list[int]:
        other = dataclasses.replace(request, prompt=context.prompt, messages=tuple(context.messages))
        return self._ids(other, field)

    def _ids(self, request: GenerationRequest, field: str) -> list[int]:
        ids = render_prompt(self.tokenizer, request)
        if not ids:
            raise InvalidArgument(field, "renders to zero tokens")
        if len(ids) + request.sampling.max_tokens > self.max_model_len:
            raise InvalidArgument(field, f"this context ({len(ids)} tokens) + max_tokens "
                                         f"({request.sampling.max_tokens}) exceeds the model's context of "
                                         f"{self.max_model_len} tokens")
        return ids


def _with_system_prompt(request: GenerationRequest, system_prompt: str) -> GenerationRequest:
    if request.messages:
        rest = tuple(m for m in request.messages if m.role != "system")
        return dataclasses.replace(request, messages=(ChatMessage("system", system_prompt), *rest))
    return dataclasses.replace(request, prompt=f"{system_prompt}\n\n{request.prompt}")
