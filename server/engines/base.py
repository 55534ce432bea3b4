"""The engine interface: what a model group replica needs from an engine, whichever library runs the model.

An engine hosts one base model (and, for token-level strategies, its guides), owns its tokenizer and chat
template, and turns a GenerationRequest into a stream of GenerationChunks. Engines batch concurrent requests
themselves (the transformers engine steps all live sequences together; vLLM schedules its own batch).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import AsyncIterator, Sequence

from decoding.chat import ChatMessage
from decoding.sampling import SamplingParams
from decoding.strategies import Report, Strategy


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    # Absolute wall-clock time (time.time()) after which the work is abandoned; None: no deadline.
    deadline: float | None = None
    # A token-level strategy's knobs (decoding/strategies.py); None: plain sampling.
    strategy: Strategy | None = None
    # The W3C trace context (traceparent, tracestate) of the span this request's work belongs to; empty when the
    # request is not traced (server/tracing.py).
    trace_context: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)
    # vLLM companion groups: steps the request's rows waited for each other (server/engines/vllm_companions.py).
    companion_waits: int = 0


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    """When a generated sequence went from one engine phase to the next (wall clock, time.time()): `admitted` when
    the engine scheduled it (its KV slots taken; vLLM: scheduled), `first_token` when its prefill ended with its
    first sampled token. Before `admitted` it waited in the engine's queue, after `first_token` it decoded."""
    admitted: float
    first_token: float


@dataclasses.dataclass
class GenerationChunk:
    """New text and token ids; the last chunk of a request has `finish_reason`, `usage`, `seed` (and the strategy's
    `report`) set."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length"
    usage: Usage | None = None
    seed: int | None = None
    report: Report | None = None
    # A request-level strategy's finished phase (best-of-N: candidates sampled, a round judged); no text.
    progress: object | None = None
    # On the last chunk of a sequence the engine generated itself (not a request-level strategy's answer).
    phases: PhaseTimes | None = None


async def whole_completion(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    """A streamed completion as one chunk (text, ids, and the last chunk's finish, usage and seed)."""
    text, ids, last = [], [], None
    async with contextlib.aclosing(chunks) as stream:
        async for chunk in stream:
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
    return GenerationChunk("".join(text), ids, last.finish_reason, last.usage, last.seed, last.report)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    engine: str
    device: str
    dtype: str
    max_model_len: int


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    # The base model's KV cache in use, 0..1: tokens cached over the slot cache's capacity (transformers), or vLLM's
    # own `vllm:kv_cache_usage_perc` (its blocks in use).
    kv_cache_usage: float


class Engine(abc.ABC):
    # The base model's tokenizer (transformers' AutoTokenizer, chat template included) and context length: what
    # request-level strategies need to build prompts that fit.
    tokenizer: object
    max_model_len: int
    # Most candidate ids one `score` call (one position of `score_along`) may read; None: no limit.
    score_id_limit: int | None = None
    # Whether `score_along` reads all its positions from one forward (else one forward per position that reads ids).
    score_along_in_one_forward: bool = True

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Streams the completion. Raises InvalidArgument / ChorusError subclasses for requests it refuses.

        Closing the iterator early (client gone, deadline) aborts the request's work in the engine.
        """

    # ---- whole-sequence building blocks for request-level strategies (best-of-N, judges, reranking) ----
    # Each runs under the request's deadline (DeadlineExceeded) and is aborted when its caller is cancelled; each is
    # counted in `load`, and concurrent calls are batched by the engine.

    @abc.abstractmethod
    async def sample_n(self, request: GenerationRequest, n: int) -> list[GenerationChunk]:
        """n completions of one prompt sharing one prefill of it. Each chunk is one whole completion (text, token
        ids, finish_reason, usage of that sample, seed). With `request.sampling.seed` set, the n samples are the same
        whatever else shares the batch."""

    async def score(self, request: GenerationRequest, candidate_ids: Sequence[int]) -> list[float]:
        """Exact log-probabilities (log-softmax of the full next-token distribution) of `candidate_ids` after the
        request's prompt: one forward of the prompt (judge verdict tokens)."""
        return (await self.score_along(request, (), [candidate_ids]))[0]

    @abc.abstractmethod
    async def score_along(self, request: GenerationRequest, continuation: Sequence[int],
                          candidate_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """`score` at every position of prompt + continuation: the exact log-probabilities of candidate_ids[j] after
        the prompt + continuation[:j], for j = 0 … len(continuation) (a position may read no ids). Listwise
        reranking reads Qwen's merged "[A" after the prompt and "O" after prompt + "[" with it. The transformers
        engine reads every position from one forward of prompt + continuation; vLLM reads them one after the other,
        each a request whose prompt blocks its prefix cache shares."""

    @abc.abstractmethod
    async def loglik(self, request: GenerationRequest, continuation: Sequence[int]) -> list[float]:
        """Per-token log-probabilities of `continuation` after the request's prompt (teacher-forced): their sum is
        the continuation's log-likelihood."""

    @abc.abstractmethod
    def strategy_support(self) -> dict[str, str | None]:
        """Per token-level strategy (GenerateRequest oneof field): None if served, else why not."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...
