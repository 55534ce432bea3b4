"""What resolving a request's strategy needs of its model group: the guides, the tokenizer, the context length.

Engine-neutral: the transformers engine steps a plan's streams on its own runners; the vLLM engine ships the PlanSpec
to its logits processor. Everything a request can get wrong is caught while resolving, before any model work:
unknown guides (INVALID_ARGUMENT) and strategies the group's config cannot serve (FAILED_PRECONDITION, with the
same reason ListModels gives).
"""

from __future__ import annotations

import dataclasses

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.plans import StreamSpec
from decoding.strategies import Context
from server.config import GroupSpec, GuideSpec, ModelSpec
from server.engines.base import GenerationRequest
from server.engines.prompts import render_prompt
from server.errors import FailedPrecondition
from server.lockstep.guides import parameter_count


def needs_role(group: GroupSpec, role: str, what: str) -> str | None:
    """None when the group has a guide with `role`, else why `what` is unavailable."""
    return None if group.guides_with_role(role) else f"{what} needs a guide with role {role!r} in the group's config"


class PlanContext:
    """A model group's guides and tokenizer, and the per-strategy state prepared from its config."""

    def __init__(self, group: GroupSpec, tokenizer, max_model_len: int, models: dict[str, ModelSpec]):
        self.group = group
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.models = models  # the config's models (at least the group's base and guide models)
        self._parameters: dict[str, int] = {}
        # Per strategy field: what its `prepare` made of the group's config once (e.g. refusal marker ids).
        self.prepared: dict[str, object] = {}

    def guide(self, field: str, name: str, role: str, what: str) -> GuideSpec:
        """The guide the request names in `field`, or the group's first guide with `role`."""
        group = self.group
        if name:
            if name not in group.guides:
                raise InvalidArgument(field, f"unknown guide {name!r}; this model's guides: {sorted(group.guides)}")
            return group.guides[name]
        candidates = group.guides_with_role(role)
        if not candidates:
            raise FailedPrecondition(f"{what} needs a guide with role {role!r}; the config of model "
                                     f"{group.base!r} declares none (guides: {sorted(group.guides) or 'none'})")
        return candidates[0]

    def parameters(self, model: str) -> int:
        """A model's parameter count (from its config, once)."""
        if model not in self._parameters:
            self._parameters[model] = parameter_count(self.models[model])
        return self._parameters[model]

    def stream(self, request: GenerationRequest, guide: GuideSpec, prompt_ids: list[int]) -> StreamSpec:
        """The guide's stream on the request's prompt (with the guide's system prompt, for in-context experts).
        A guide that is the base model on the very same prompt reuses the base's logits (model None)."""
        ids = prompt_ids
        if guide.system_prompt:
            ids = self.ids(_with_system_prompt(request, guide.system_prompt), f"guides.{guide.name}")
        if guide.model == self.group.base and list(ids) == list(prompt_ids):
            return StreamSpec(None)
        return StreamSpec(guide.model, tuple(ids))

    def context_ids(self, request: GenerationRequest, context: Context, field: str) -> list[int]:
        """Token ids of another context (USCD's lame prompt, STEER's negative context) for the base model."""
        other = dataclasses.replace(request, prompt=context.prompt, messages=tuple(context.messages))
        return self.ids(other, field)

    def ids(self, request: GenerationRequest, field: str) -> list[int]:
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
