"""The engine interface: what a model group replica needs from an engine, whichever library runs the model.

An engine hosts one base model (and, for token-level strategies, its guides), owns its tokenizer and chat
template, and turns a GenerationRequest into a stream of GenerationChunks. Engines batch concurrent requests
themselves (the transformers engine steps all live sequences together; vLLM schedules its own batch).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import AsyncIterator

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


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)


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


class Engine(abc.ABC):
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Streams the completion. Raises InvalidArgument / ChorusError subclasses for requests it refuses.

        Closing the iterator early (client gone, deadline) aborts the request's work in the engine.
        """

    @abc.abstractmethod
    def strategy_support(self) -> dict[str, str | None]:
        """Per token-level strategy (GenerateRequest oneof field): None if served, else why not."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...
