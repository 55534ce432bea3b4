"""Best-of-N in the strategy layer: protobuf ↔ params, report and progress; the request-level program.

The selection rules are decoding/best_of_n.py. Here they meet an engine: candidates come from one `sample_n` call
(one prefill of the prompt, forked) or, composed with a token-level strategy, from n `generate` calls the engine
steps in lock-step; every judge call of a round is issued at once, so the engine batches them with whatever else it
is running (other requests' rounds included). The judge is the group's base model, under a `judge` guide's system
prompt if the group has one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from typing import AsyncIterator, Callable, Sequence

from chorus.v1 import decoding_pb2 as pb
from decoding import best_of_n as bon
from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from decoding.strategies import BestOfNCandidate, BestOfNParams, BestOfNProgress, BestOfNReport
from server.config import GroupSpec, GuideSpec
from server.engines.base import Engine, GenerationChunk, GenerationRequest, Usage, whole_completion
from server.engines.prompts import chat_prompt_text, render_prompt
from server import tracing
from server.errors import FailedPrecondition
from server.strategies.protobuf import enum_choice, optionals

_VERDICTS = {pb.BestOfN.VERDICT_UNSPECIFIED: None, pb.BestOfN.VERDICT_GENERATE: "generate",
             pb.BestOfN.VERDICT_SCORE: "score"}
_SELECTIONS = {pb.BestOfN.SELECTION_UNSPECIFIED: "knockout", pb.BestOfN.SELECTION_KNOCKOUT: "knockout",
               pb.BestOfN.SELECTION_POINTWISE: "pointwise"}
_TEMPLATES = {pb.BestOfN.TEMPLATE_UNSPECIFIED: "math", pb.BestOfN.TEMPLATE_MATH: "math",
              pb.BestOfN.TEMPLATE_GENERAL: "general"}
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
# best_of_n.sampling fields that override the request's (its seed is best_of_n.seed).
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k")
# Tokens of slack for the chat template's markup around the judge's messages in the worst-case context check.
_TEMPLATE_SLACK = 32


def from_proto(p: pb.BestOfN, candidates_from_proto: Callable[[str, object], object]) -> BestOfNParams:
    """`candidates_from_proto(field, message)` turns the `candidates` oneof's message into that token-level
    strategy's params (the registry's entry for it); their bad fields are reported under `best_of_n.`."""
    overrides = dict(optionals(p.sampling, _SAMPLING_FIELDS))
    if p.sampling.stop:
        overrides["stop"] = tuple(p.sampling.stop)
    if p.sampling.ignore_eos:
        overrides["ignore_eos"] = True
    which = p.WhichOneof("candidates")
    candidates = None
    if which is not None:
        try:
            candidates = candidates_from_proto(which, getattr(p, which))
        except InvalidArgument as error:
            raise InvalidArgument(f"best_of_n.{error.field}", error.reason) from None
    return BestOfNParams(
        n=p.n if p.HasField("n") else BestOfNParams.n, sampling_overrides=tuple(overrides.items()), judge=p.judge,
        verdict=enum_choice(_VERDICTS, p.verdict, "best_of_n.verdict"), both_orders=p.both_orders, selection=enum_choice(_SELECTIONS, p.selection, "best_of_n.selection"),
        template=enum_choice(_TEMPLATES, p.template, "best_of_n.template"), seed=p.seed if p.HasField("seed") else None,
        judge_max_tokens=p.judge_max_tokens if p.HasField("judge_max_tokens") else None, candidates=candidates,
    ).validate()


def report_to_proto(report: BestOfNReport) -> pb.BestOfNReport:
    message = pb.BestOfNReport(
        selection=report.selection, verdict=report.verdict, both_orders=report.both_orders, template=report.template,
        judge=report.judge, winner=report.winner, judge_calls=report.judge_calls, judge_tokens=report.judge_tokens,
        pointwise_scores=report.pointwise_scores,
        candidates=[pb.BestOfNCandidate(text=c.text, token_ids=c.token_ids, finish_reason=_FINISH[c.finish_reason],
                                        answer=c.answer or "") for c in report.candidates])
    bracket = report.bracket
    if bracket is not None:
        message.rounds = bracket.rounds
        message.stopped_early = bracket.stopped_early
        message.fallback_rounds.extend(bracket.fallback_rounds)
        message.byes.extend(pb.BestOfNBye(round=r, candidate=c) for r, c in bracket.byes)
        for m in bracket.matches:
            match = message.bracket.add(round=m.round, a=m.a, b=m.b, a_score=m.a_score, b_score=m.b_score)
            if m.winner is not None:
                match.winner = m.winner
            match.judgements.extend(
                pb.BestOfNJudgement(first=j.first, second=j.second, first_score=j.first_score,
                                    second_score=j.second_score, parse=j.how, judge_tokens=j.judge_tokens)
                for j in m.judgements)
    return message


def progress_to_proto(progress: BestOfNProgress) -> pb.BestOfNProgress:
    return pb.BestOfNProgress(phase=progress.phase, round=progress.round, remaining=progress.remaining,
                              judge_calls=progress.judge_calls)


def availability(group: GroupSpec) -> str | None:
    """Always served: without a judge guide the base model judges."""
    return None


# ---- the program ----

@dataclasses.dataclass
class Work:
    """What a request has cost so far, summed over its candidates and judge calls."""
    forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)
    judge_calls: int = 0
    judge_tokens: int = 0

    def add(self, usage: Usage | None) -> None:
        for model, passes in (usage.forward_passes if usage else {}).items():
            self.forward_passes[model] = self.forward_passes.get(model, 0) + passes


class Judge:
    """Judge calls on the base model: GENERATE (greedy, parsed) or SCORE (probabilities of the verdict words)."""

    def __init__(self, engine: Engine, group: GroupSpec, request: GenerationRequest, p: BestOfNParams,
                 guide: GuideSpec | None, question: str, texts: list[str], work: Work):
        self.engine, self.group, self.request, self.p = engine, group, request, p
        self.system_prompt = guide.system_prompt if guide and guide.system_prompt else bon.JUDGE_SYSTEM_PROMPT
        self.question, self.texts, self.work = question, texts, work
        self.calls = 0

    def _messages(self, user: str) -> tuple[ChatMessage, ...]:
        return ChatMessage("system", self.system_prompt), ChatMessage("user", user)

    def _request(self, sampling: SamplingParams, **fields) -> GenerationRequest:
        self.calls += 1
        return GenerationRequest(request_id=f"{self.request.request_id}-judge{self.calls}", sampling=sampling,
                                 deadline=self.request.deadline, **fields)

    async def pairs(self, pairs: list[tuple[int, int]]) -> list[tuple[bon.Judgement, ...]]:
        """`decoding.best_of_n.Judge`: every call of a round at once."""
        orders = [[(a, b), (b, a)] if self.p.both_orders else [(a, b)] for a, b in pairs]
        flat = [order for match in orders for order in match]
        judge = self._generate if self.p.verdict_mode == "generate" else self._score_pair
        with tracing.span("chorus.best_of_n.round", self.request.trace_context,
                          attributes={"chorus.matches": len(pairs), "chorus.judge_calls": len(flat)}):
            done = await asyncio.gather(*(judge(first, second) for first, second in flat))
        self.work.judge_calls += len(flat)
        it = iter(done)
        return [tuple(next(it) for _ in match) for match in orders]

    async def _generate(self, first: int, second: int) -> bon.Judgement:
        user = bon.pair_prompt(self.p.template, self.question, self.texts[first], self.texts[second])
        messages = self._messages(user)
        prompt_tokens = len(render_prompt(self.engine.tokenizer, GenerationRequest("", SamplingParams(),
                                                                                   messages=messages)))
        room = self.engine.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidArgument("best_of_n.template", f"the judge's prompt comparing candidates {first} and "
                                  f"{second} ({prompt_tokens} tokens) fills the model's context of "
                                  f"{self.engine.max_model_len} tokens")
        sampling = SamplingParams(max_tokens=min(judge_token_limit(self.group, self.p), room), temperature=0.0,
                                  stop=(f"</{bon.TAG_B}>",))
        chunk = await whole_completion(self.engine.generate(self._request(sampling, messages=messages)))
        self.work.add(chunk.usage)
        self.work.judge_tokens += len(chunk.token_ids)
        verdict = bon.parse_verdict(chunk.text)
        return bon.Judgement(first, second, float(verdict.a is True), float(verdict.b is True), verdict.how,
                             len(chunk.token_ids))

    async def _score_pair(self, first: int, second: int) -> bon.Judgement:
        """p(Correct) at A's tag, then at B's tag after A's likelier verdict. An engine that reads every position of
        a continuation in one forward takes B's read in A's forward, the reply continued as if A were judged
        Correct: one forward when it is, a second one (B after "Incorrect") when not. The probabilities are those
        of the two separate reads either way."""
        user = bon.pair_prompt(self.p.template, self.question, self.texts[first], self.texts[second])
        if self.engine.score_along_in_one_forward:
            first_score, if_correct = await self._p_correct_both(user)
            if first_score >= 0.5 and if_correct is not None:
                return bon.Judgement(first, second, first_score, if_correct, "probability")
        else:
            first_score = await self._p_correct(user, bon.score_prefix(bon.TAG_A))
        second_score = await self._p_correct(user, bon.score_prefix(bon.TAG_B, [(bon.TAG_A, first_score >= 0.5)]))
        return bon.Judgement(first, second, first_score, second_score, "probability")

    async def alone(self, candidate: int) -> float:
        user = bon.alone_prompt(self.p.template, self.question, self.texts[candidate])
        return await self._p_correct(user, bon.score_prefix(bon.TAG_ALONE))

    async def _p_correct(self, user: str, reply_prefix: str) -> float:
        """p(Correct) / (p(Correct) + p(Incorrect)) for the verdict word after the judge's reply began with
        `reply_prefix`: one forward of the prompt (`score`)."""
        tokenizer = self.engine.tokenizer
        text = chat_prompt_text(tokenizer, self._messages(user), reply_prefix)
        correct, incorrect = _verdict_token_ids(tokenizer, text)
        sampling = SamplingParams(max_tokens=1, temperature=0.0)
        logprobs = await self.engine.score(self._request(sampling, prompt=text), [correct, incorrect])
        self.work.forward_passes[self.group.base] = self.work.forward_passes.get(self.group.base, 0) + 1
        return _odds(logprobs)

    async def _p_correct_both(self, user: str) -> tuple[float, float | None]:
        """From one forward: p(Correct) at A's tag, and at B's tag after A's line with the verdict Correct (None
        when the tokens of that reply do not extend A's prompt token for token; then A's read alone)."""
        tokenizer = self.engine.tokenizer
        at_a = chat_prompt_text(tokenizer, self._messages(user), bon.score_prefix(bon.TAG_A))
        at_b = chat_prompt_text(tokenizer, self._messages(user), bon.score_prefix(bon.TAG_B, [(bon.TAG_A, True)]))
        ids_a, ids_b = tokenizer.encode(at_a), tokenizer.encode(at_b)
        continuation = ids_b[len(ids_a):] if ids_b[:len(ids_a)] == ids_a and len(ids_b) > len(ids_a) else []
        reads = [_verdict_token_ids(tokenizer, at_a)]
        if continuation:
            reads += [()] * (len(continuation) - 1) + [_verdict_token_ids(tokenizer, at_b)]
        logprobs = await self.engine.score_along(
            self._request(SamplingParams(max_tokens=1, temperature=0.0), prompt=at_a), continuation, reads)
        self.work.forward_passes[self.group.base] = self.work.forward_passes.get(self.group.base, 0) + 1
        return _odds(logprobs[0]), (_odds(logprobs[-1]) if continuation else None)


def _odds(logprobs: Sequence[float]) -> float:
    """p(Correct) / (p(Correct) + p(Incorrect)) from their log-probabilities."""
    return 1.0 / (1.0 + math.exp(logprobs[1] - logprobs[0]))


def _verdict_token_ids(tokenizer, text: str) -> tuple[int, int]:
    """The first token of "Correct" and of "Incorrect" right after `text`."""
    base = tokenizer.encode(text)
    firsts = []
    for word in (bon.CORRECT, bon.INCORRECT):
        ids = tokenizer.encode(text + word)
        if ids[:len(base)] != base or len(ids) == len(base):
            raise FailedPrecondition(f"this tokenizer merges {word!r} into the text before it; SCORE verdicts cannot "
                                     "be read with it (use VERDICT_GENERATE)")
        firsts.append(ids[len(base)])
    if firsts[0] == firsts[1]:
        raise FailedPrecondition("this tokenizer starts 'Correct' and 'Incorrect' with the same token; SCORE verdicts "
                                 "cannot be read with it (use VERDICT_GENERATE)")
    return firsts[0], firsts[1]


def question_of(request: GenerationRequest) -> str:
    """What the judge is told the task was: the raw prompt, or the last user message."""
    if request.prompt:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else request.messages[-1].content


def _judge_guide(group: GroupSpec, name: str) -> GuideSpec | None:
    if name:
        guide = group.guides.get(name)
        if guide is None or "judge" not in guide.roles:
            judges = [g.name for g in group.guides_with_role("judge")]
            raise InvalidArgument("best_of_n.judge", f"{name!r} is not a judge of model {group.base!r} (its guides "
                                                     f"with role judge: {judges or 'none'}; empty: the base model)")
        return guide
    judges = group.guides_with_role("judge")
    return judges[0] if judges else None


def candidate_sampling(request: GenerationRequest, p: BestOfNParams, seed: int) -> SamplingParams:
    """The request's sampling with the candidates' overrides; temperature 0.7 when that leaves it greedy and no
    candidate temperature was sent."""
    overrides = dict(p.sampling_overrides)
    sampling = dataclasses.replace(request.sampling, **overrides, seed=seed)
    if sampling.greedy and "temperature" not in overrides:
        sampling = dataclasses.replace(sampling, temperature=BestOfNParams.DEFAULT_CANDIDATE_TEMPERATURE)
    try:
        return sampling.validate()
    except InvalidArgument as error:
        raise InvalidArgument(f"best_of_n.sampling.{error.field.split('.')[-1]}", error.reason) from None


def judge_token_limit(group: GroupSpec, p: BestOfNParams) -> int:
    """Tokens the judge may write per comparison: the request's, else the group's limit (which it may not exceed)."""
    limit = group.best_of_n.judge_max_tokens
    if p.judge_max_tokens is None:
        return limit
    if p.judge_max_tokens > limit:
        raise InvalidArgument("best_of_n.judge_max_tokens", f"{p.judge_max_tokens} is over model {group.base!r}'s "
                                                            f"limit of {limit} (best_of_n.judge_max_tokens)")
    return p.judge_max_tokens


def _check_limits(engine: Engine, group: GroupSpec, p: BestOfNParams, sampling: SamplingParams, question: str
                  ) -> None:
    limits = group.best_of_n
    if p.n > limits.max_n:
        raise InvalidArgument("best_of_n.n", f"{p.n} candidates; model {group.base!r} allows at most {limits.max_n} "
                                             "(its config's best_of_n.max_n)")
    calls = p.n if p.selection == "pointwise" else (p.n - 1) * (2 if p.both_orders else 1)
    judge_tokens = judge_token_limit(group, p) if p.verdict_mode == "generate" else 0
    total = p.n * sampling.max_tokens + calls * judge_tokens
    if total > limits.max_total_tokens:
        raise InvalidArgument("best_of_n.n", f"up to {p.n} × {sampling.max_tokens} candidate tokens + {calls} judge "
                                             f"calls × {judge_tokens} tokens = {total} tokens, over this model's "
                                             f"limit of {limits.max_total_tokens} (best_of_n.max_total_tokens)")
    shown = 1 if p.selection == "pointwise" else 2
    empty = (bon.alone_prompt(p.template, question, "") if shown == 1
             else bon.pair_prompt(p.template, question, "", ""))
    fixed = len(engine.tokenizer.encode(bon.JUDGE_SYSTEM_PROMPT + empty)) + _TEMPLATE_SLACK
    worst = fixed + shown * sampling.max_tokens + max(judge_tokens, 1)
    if worst > engine.max_model_len:
        raise InvalidArgument("best_of_n.template", f"the judge's prompt ({fixed} tokens with the question) + {shown} "
                              f"candidate(s) of up to {sampling.max_tokens} tokens + {max(judge_tokens, 1)} verdict "
                              f"tokens = {worst} tokens, over the model's context of {engine.max_model_len}; lower "
                              "the candidates' max_tokens")


async def _candidates(engine: Engine, request: GenerationRequest, p: BestOfNParams, sampling: SamplingParams
                      ) -> list[GenerationChunk]:
    if p.candidates is None:
        return await engine.sample_n(dataclasses.replace(request, sampling=sampling, strategy=None), p.n)
    return list(await asyncio.gather(*(
        whole_completion(engine.generate(dataclasses.replace(
            request, request_id=f"{request.request_id}-c{i}", strategy=p.candidates,
            sampling=dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63))))
        for i in range(p.n))))


async def run(engine: Engine, group: GroupSpec, request: GenerationRequest, p: BestOfNParams
              ) -> AsyncIterator[GenerationChunk]:
    """Candidates, then the selection; streams a progress chunk per phase, the winner's text, the final chunk."""
    question = question_of(request)
    guide = _judge_guide(group, p.judge)
    seed = p.seed if p.seed is not None else request.sampling.request_seed()
    sampling = candidate_sampling(request, p, seed)
    _check_limits(engine, group, p, sampling, question)
    work = Work()
    with tracing.span("chorus.best_of_n.candidates", request.trace_context, attributes={"chorus.n": p.n}):
        chunks = await _candidates(engine, request, p, sampling)
    for chunk in chunks:
        work.add(chunk.usage)
    candidates = [BestOfNCandidate(c.text, list(c.token_ids), c.finish_reason, bon.answer_key(c.text, p.template))
                  for c in chunks]
    yield GenerationChunk("", [], progress=BestOfNProgress("candidates", remaining=len(candidates)))
    judge = Judge(engine, group, request, p, guide, question, [c.text for c in candidates], work)
    report = BestOfNReport(selection=p.selection, verdict=p.verdict_mode, both_orders=p.both_orders,
                           template=p.template, judge=guide.name if guide else group.base, seed=seed,
                           candidates=candidates, winner=0)
    if p.selection == "pointwise":
        if len(candidates) > 1:
            with tracing.span("chorus.best_of_n.scoring", request.trace_context,
                              attributes={"chorus.judge_calls": len(candidates)}):
                report.pointwise_scores = list(await asyncio.gather(*(judge.alone(i)
                                                                      for i in range(len(candidates)))))
            work.judge_calls += len(candidates)
            yield GenerationChunk("", [], progress=BestOfNProgress("scored", remaining=1,
                                                                   judge_calls=work.judge_calls))
        report.winner = bon.pointwise_winner(report.pointwise_scores or [0.0])
    else:
        keys = [c.answer for c in candidates]
        async for bracket in bon.knockout(keys, judge.pairs, random.Random(seed), p.both_orders):
            if bracket.winner is None:
                yield GenerationChunk("", [], progress=BestOfNProgress(
                    "round", round=bracket.rounds, remaining=len(bracket.remaining), judge_calls=work.judge_calls))
        report.bracket = bracket
        report.winner = bracket.winner
    report.judge_calls, report.judge_tokens = work.judge_calls, work.judge_tokens
    winner = chunks[report.winner]
    yield GenerationChunk(winner.text, list(winner.token_ids))
    usage = Usage(prompt_tokens=winner.usage.prompt_tokens if winner.usage else 0,
                  completion_tokens=len(winner.token_ids), forward_passes=work.forward_passes)
    yield GenerationChunk("", [], finish_reason=winner.finish_reason, usage=usage, seed=seed, report=report)
