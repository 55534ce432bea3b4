"""Listwise reranking (the Rerank RPC) in the strategy layer: protobuf ↔ params and outcome, and the program that
runs a request's windows on a group's engine.

The ranking rules are decoding/rerank.py. Here they meet an engine: a window under MODE_FIRST_TOKEN is one
`score_along` call (below), reading the exact log-probabilities of every identifier's tokens (the transformers
engine's log-softmax of the raw logits, vLLM's `logprob_token_ids`; never a top-k list); under MODE_GENERATE it is one
greedy `generate` call. A request's windows run one after the other (each reorders what the next one sees); the
calls of one window (its permutations) are issued at once, and the engine batches them with other requests' windows.

Identifier tokens are checked once per tokenizer when the group's replica starts (`identifier_tokens`): how the
reply's "[A", "[B", … tokenize right after the assistant turn. Each must be one or two tokens ("[" + "A" on SmolLM2,
"[A" merged on Qwen2.5 but "[" + "O"); the reads are then exact (`decoding.rerank.identifier_reads`): one
`score_along` of prompt + "[" per window in both cases, reading the merged identifiers after the prompt and the
letters after "[" (one forward on the transformers engine; on vLLM two requests, the second finding the prompt in
the prefix cache). Letters past the first one spelled otherwise bound the window size (INVALID_ARGUMENT on
`window_size`); a tokenizer that spells fewer than two makes reranking unavailable for the model, with the reason
in ListModels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

from chorus.v1 import decoding_pb2 as pb
from decoding import rerank as rr
from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import GroupSpec
from server.engines.base import Engine, GenerationRequest, Usage, whole_completion
from server.engines.prompts import chat_prompt_text
from server.errors import FailedPrecondition
from server import tracing
from server.strategies.protobuf import enum_choice

_MODES = {pb.RerankRequest.MODE_UNSPECIFIED: "first_token", pb.RerankRequest.MODE_FIRST_TOKEN: "first_token",
          pb.RerankRequest.MODE_GENERATE: "generate"}
_AGGREGATIONS = {pb.RerankRequest.AGGREGATION_UNSPECIFIED: "kemeny", pb.RerankRequest.AGGREGATION_KEMENY: "kemeny",
                 pb.RerankRequest.AGGREGATION_BORDA: "borda"}
# Tokens MODE_GENERATE may write beyond a well-formed permutation of the window (spacing, the end token).
_GENERATE_SLACK = 8


def from_proto(p: pb.RerankRequest) -> rr.RerankParams:
    def opt(name: str, default):
        return getattr(p, name) if p.HasField(name) else default

    defaults = rr.RerankParams
    if p.mode not in _MODES:
        raise InvalidArgument("mode", f"unknown value {p.mode}")
    if p.aggregation not in _AGGREGATIONS:
        raise InvalidArgument("aggregation", f"unknown value {p.aggregation}")
    return rr.RerankParams(
        query=p.query, passages=tuple(p.passages), top_n=p.top_n,
        window_size=opt("window_size", defaults.window_size), stride=opt("stride", defaults.stride),
        mode=enum_choice(_MODES, p.mode, "mode"), permutations=opt("permutations", defaults.permutations),
        aggregation=enum_choice(_AGGREGATIONS, p.aggregation, "aggregation"), max_passage_words=opt("max_passage_words",
                                                                         defaults.max_passage_words),
        seed=opt("seed", defaults.seed),
    ).validate()


@dataclasses.dataclass(frozen=True)
class RerankJob:
    """What crosses from the front end to the group's replica."""
    request_id: str
    params: rr.RerankParams
    deadline: float | None = None  # time.time() after which the work is abandoned
    # The W3C trace context of the span the job's work belongs to (server/tracing.py); empty: not traced.
    trace_context: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class WindowReport:
    start: int
    end: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    latency_ms: float = 0.0
    passage_words: int = 0


@dataclasses.dataclass
class RerankOutcome:
    ranking: list[int]  # passage indices, best first (all of them; top_n is applied in `outcome_to_proto`)
    windows: list[WindowReport]
    usage: Usage


def outcome_to_proto(outcome: RerankOutcome, params: rr.RerankParams, request_id: str, model: str
                     ) -> pb.RerankResponse:
    count = len(outcome.ranking)
    shown = outcome.ranking[:params.top_n] if params.top_n else outcome.ranking
    usage = outcome.usage
    return pb.RerankResponse(
        ranking=shown, scores=[float(count - place) for place in range(len(shown))], request_id=request_id,
        model=model, usage=pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                    forward_passes=usage.forward_passes),
        windows=[pb.RerankWindow(**dataclasses.asdict(w)) for w in outcome.windows])


@dataclasses.dataclass(frozen=True)
class Identifiers:
    """How a model's tokenizer spells the window identifiers "[A", "[B", … at the start of the reply."""
    # Per letter, from A: its tokens right after the assistant turn (one or two); letters past the first that cannot
    # be read (three tokens or more) are left out, so a window may have at most len(spellings) passages.
    spellings: tuple[tuple[int, ...], ...]


def identifier_tokens(tokenizer, model: str) -> Identifiers:
    """The identifiers' spellings after this model's chat template; FailedPrecondition naming the model when fewer
    than two letters can be read."""
    messages = (ChatMessage("system", rr.SYSTEM_PROMPT), ChatMessage("user", rr.user_prompt("q", ["p", "p"])))
    text = chat_prompt_text(tokenizer, messages)
    base = tokenizer.encode(text)
    spellings = []
    for letter in rr.IDENTIFIERS:
        spelled = tokenizer.encode(f"{text}[{letter}")
        tail = tuple(spelled[len(base):])
        if spelled[:len(base)] != base or not 1 <= len(tail) <= 2:
            break
        if any(tail[:len(other)] == other or other[:len(tail)] == tail for other in spellings):
            break  # one spelling begins another: their probabilities cannot be told apart
        spellings.append(tail)
    if len(spellings) < 2:
        raise FailedPrecondition(f"model {model!r}: its tokenizer spells fewer than two of the identifiers '[A', "
                                 "'[B', … in one or two tokens after the assistant turn; listwise reranking cannot "
                                 "read them")
    return Identifiers(tuple(spellings))


class Reranker:
    """A group's reranking over its engine: the identifier check (once), then `run` per request."""

    def __init__(self, engine: Engine, group: GroupSpec):
        self.engine, self.group = engine, group
        guides = group.guides_with_role("reranker")
        self.system_prompt = guides[0].system_prompt if guides and guides[0].system_prompt else rr.SYSTEM_PROMPT
        try:
            self.identifiers: Identifiers | None = identifier_tokens(engine.tokenizer, group.base)
            self.unavailable: str | None = None
        except FailedPrecondition as error:
            self.identifiers, self.unavailable = None, str(error)

    def _check(self, p: rr.RerankParams) -> None:
        if self.unavailable is not None:
            raise FailedPrecondition(self.unavailable)
        limits = self.group.rerank
        if len(p.passages) > limits.max_passages:
            raise InvalidArgument("passages", f"{len(p.passages)} passages; model {self.group.base!r} takes at most "
                                              f"{limits.max_passages} (its config's rerank.max_passages)")
        if p.permutations > limits.max_permutations:
            raise InvalidArgument("permutations", f"{p.permutations}; model {self.group.base!r} allows at most "
                                                  f"{limits.max_permutations} (its config's rerank.max_permutations)")
        window = min(p.window_size, len(p.passages))
        if p.mode != "first_token":
            return
        readable = len(self.identifiers.spellings)
        if window > readable:
            raise InvalidArgument("window_size", f"{window} passages a window; model {self.group.base!r}'s tokenizer "
                                                 f"spells only [A] … [{rr.IDENTIFIERS[readable - 1]}] in at most two "
                                                 f"tokens, so its windows hold at most {readable} passages")
        limit = self.engine.score_id_limit
        reads = rr.identifier_reads(self.identifiers.spellings[:window])
        widest = max(len(ids) for _, positions in reads for ids in positions)
        if limit is not None and widest > limit:
            raise InvalidArgument("window_size", f"{window} passages need {widest} log-probabilities at once; model "
                                                 f"{self.group.base!r}'s engine reads at most {limit} (vLLM "
                                                 "max_logprobs)")

    def _prompt(self, query: str, passages: list[str], words: int) -> str:
        user = rr.user_prompt(query, [rr.clean_passage(text, words) for text in passages])
        return chat_prompt_text(self.engine.tokenizer, (ChatMessage("system", self.system_prompt),
                                                        ChatMessage("user", user)))

    def window_prompt(self, p: rr.RerankParams, passages: list[int]) -> tuple[str, int]:
        """The prompt shown for these passages of a request (indices into p.passages, in the order shown) as one
        window, and the word limit its passages were cut to so that it fits the context."""
        words = self._fit(p, [passages])
        return self._prompt(p.query, [p.passages[i] for i in passages], words), words

    def _prompt_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer.encode(text))

    async def run(self, job: RerankJob) -> RerankOutcome:
        p = job.params
        self._check(p)
        order = list(range(len(p.passages)))
        rng = random.Random(p.seed)
        windows = []
        usage = Usage()
        for start, end in rr.window_schedule(len(order), p.window_size, p.stride):
            began = time.monotonic()
            items = order[start:end]
            report = WindowReport(start, end)
            shown_orders = rr.shuffles(len(items), p.permutations, rng)
            with tracing.span("chorus.rerank.window", job.trace_context,
                              attributes={"chorus.window.start": start, "chorus.window.end": end,
                                          "chorus.permutations": len(shown_orders)}):
                report.passage_words = self._fit(p, [[items[i] for i in shown] for shown in shown_orders])
                rankings = await asyncio.gather(*(
                    self._rank(job, [items[i] for i in shown], report, f"{job.request_id}-w{start}-p{k}")
                    for k, shown in enumerate(shown_orders)))
            in_window = [[shown[i] for i in ranking] for shown, ranking in zip(shown_orders, rankings)]
            order[start:end] = [items[i] for i in rr.aggregate(in_window, len(items), p.aggregation)]
            report.latency_ms = 1000 * (time.monotonic() - began)
            windows.append(report)
            usage.prompt_tokens += report.prompt_tokens
            usage.completion_tokens += report.completion_tokens
        usage.forward_passes = {self.group.base: sum(w.forward_passes for w in windows)}
        return RerankOutcome(order, windows, usage)

    def _generate_tokens(self, size: int) -> int:
        return self._prompt_tokens(rr.ideal_answer(size)) + _GENERATE_SLACK

    def _fit(self, p: rr.RerankParams, shown: list[list[int]]) -> int:
        """The word limit at which every permutation's prompt of the window fits the context with room for a
        written permutation (the same in both modes, so both rank the same text)."""
        budget = self.engine.max_model_len - self._generate_tokens(len(shown[0]))
        words = p.max_passage_words
        for passages in shown:
            texts = [p.passages[i] for i in passages]
            fitted = rr.fit_passage_words(
                lambda limit: self._prompt_tokens(self._prompt(p.query, texts, limit)),
                budget, words, len(texts))
            if fitted is None:
                raise InvalidArgument("query", f"a window of {len(texts)} passages cut to one word each still does "
                                               f"not fit model {self.group.base!r}'s context of "
                                               f"{self.engine.max_model_len} tokens; shorten the query or lower "
                                               "window_size")
            words = fitted
        return words

    async def _rank(self, job: RerankJob, passages: list[int], report: WindowReport, call_id: str) -> list[int]:
        """One call on one shown order of a window: its order of the shown positions."""
        p = job.params
        size = len(passages)
        text = self._prompt(p.query, [p.passages[i] for i in passages], report.passage_words)
        prompt_tokens = self._prompt_tokens(text)
        if p.mode == "first_token":
            spellings = self.identifiers.spellings[:size]
            reads = rr.identifier_reads(spellings)
            results = await asyncio.gather(*(self.engine.score_along(GenerationRequest(
                f"{call_id}-r{i}", SamplingParams(max_tokens=1, temperature=0.0), deadline=job.deadline,
                prompt=text), continuation, positions) for i, (continuation, positions) in enumerate(reads)))
            report.forward_passes += len(reads) if self.engine.score_along_in_one_forward else sum(
                1 for _, positions in reads for ids in positions if ids)
            report.prompt_tokens += sum(prompt_tokens + len(continuation) for continuation, _ in reads)
            logprobs = rr.identifier_logprobs(spellings, reads, results)
            return rr.rank_first_token(zip(rr.IDENTIFIERS, logprobs), size)
        report.prompt_tokens += prompt_tokens
        request = GenerationRequest(call_id, SamplingParams(max_tokens=self._generate_tokens(size), temperature=0.0),
                                    prompt=text, deadline=job.deadline)
        written = await whole_completion(self.engine.generate(request))
        report.completion_tokens += len(written.token_ids)
        report.forward_passes += sum(written.usage.forward_passes.values()) if written.usage else 0
        return rr.parse_generated(written.text, size)
