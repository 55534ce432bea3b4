"""Transformers engine: continuous batching at step granularity over slot KV caches, lock-step across models.

One engine thread owns the base model and its guides (one ModelRunner, i.e. one slot KV cache, per model) in a
LockstepHost (server/lockstep/host.py, the same host vLLM's fusion processor uses for the guides). A request is one
base stream (the base model on its prompt) plus, for a token-level strategy, the extra streams of its plan (a guide
on the prompt, the base on a lame/negative context, in-context experts), each in its own slot. Each iteration the
thread
  1. drops cancelled and expired sequences (their slots free at once),
  2. admits waiting requests while every model they need has free slots: one prefill forward per stream, which also
     yields their first token,
  3. steps the host: one batched decode forward per model for all live streams of all requests, each request's plan
     fusing its rows (decoding/plans.py); samples one token per request from the fused scores (a token a plan forces
     is the only one its scores allow),
  4. streams each sequence's new text (incremental detokenization, stop strings) to its caller.
Requests join and leave between steps; nobody waits for a batch to drain. Callers live on asyncio loops (the
Ray Serve replica's); the thread hands chunks to them with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable, Sequence

import torch

from decoding.errors import InvalidArgument
from decoding.plans import PlanSpec
from decoding.sampling import SamplingParams, make_generator, sample
from decoding.text import IncrementalDetokenizer, StopStringMatcher
from server.config import ChorusConfig, GroupSpec, ModelSpec
from server.engines.base import (Engine, EngineInfo, EngineLoad, GenerationChunk, GenerationRequest, PhaseTimes,
                                 Usage)
from server.lockstep.guides import ModelLoader, early_exits_of
from server.strategies.registry import PlanResolver, availability
from server.engines.prompts import check_reads, check_token_ids, load_tokenizer, prompt_token_ids, stop_token_ids
from server.lockstep.host import LockstepHost
from server.lockstep.runner import ModelRunner
from server.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, Unavailable
from server.models import resolve_model_path

log = logging.getLogger(__name__)
# Score/loglik jobs batched together read at most this many next-token distributions (rows × kept positions) and
# feed at most this many tokens (rows × the longest, as if left-padded into one forward; a job longer than that runs
# alone; the runner may still split a batch of very different lengths into several forwards): the attention of a
# batch of long prompts (reranking windows of 2-3k tokens) grows with rows × length².
JOB_ROWS = 1024
JOB_TOKENS = 16384

async def _whole_completion(events: asyncio.Queue, seed: int) -> GenerationChunk:
    """One sequence's chunks joined into one (its last chunk's finish reason and usage), reporting `seed`."""
    text, token_ids = [], []
    while True:
        event = await events.get()
        if isinstance(event, BaseException):
            raise event
        text.append(event.text)
        token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            return GenerationChunk(text="".join(text), token_ids=token_ids, finish_reason=event.finish_reason,
                                   usage=event.usage, seed=seed)


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[object], None]:
    """Hands an event from the engine thread to the caller's loop; a caller whose loop has closed is gone."""
    def deliver(event: object) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
    return deliver


@dataclasses.dataclass(eq=False)
class _Sequence:
    key: str  # in the host
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    deliver: Callable[[object], None]
    plan: PlanSpec | None
    slots: collections.Counter  # KV slots per model it takes while live
    # sample_n: the other samples, admitted with this one, each a fork of its prefilled prompt (one prefill for all).
    forks: list["_Sequence"] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    live: bool = False  # in the host, holding its slots (prefilling, then decoding)
    decoding: bool = False  # prefilled: samples a token every step
    done: bool = False
    admitted_at: float = 0.0  # time.time() when it took its slots (a fork: when its leader did)
    first_token_at: float = 0.0

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def family(self) -> list["_Sequence"]:
        return [self, *self.forks]


@dataclasses.dataclass(eq=False)
class _Job:
    """One forward over a token sequence, no sampling: the log-probs of reads[j] at the j-th of its last len(reads)
    positions (score_along: every position of prompt + continuation; loglik: each continuation token at its own)."""
    request: GenerationRequest
    sequence: list[int]
    reads: list[list[int]]
    deliver: Callable[[object], None]
    done: bool = False

    @property
    def keep(self) -> int:
        """How many last positions' next-token distributions the job reads."""
        return len(self.reads)

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


def _read(log_probs: torch.Tensor, reads: list[list[int]]) -> list[list[float]]:
    """log_probs[j, ids] for each position j and its ids in `reads`, gathered in one indexing."""
    lengths = torch.tensor([len(ids) for ids in reads])
    positions = torch.repeat_interleave(torch.arange(len(reads)), lengths).to(log_probs.device)
    ids = torch.tensor([token for row in reads for token in row], dtype=torch.long, device=log_probs.device)
    values = log_probs[positions, ids].tolist()
    starts = [0, *lengths.cumsum(0).tolist()]
    return [values[a:b] for a, b in zip(starts, starts[1:])]


class TransformersEngine(Engine):
    """`config` supplies the guide models' specs; without it the group may have no guides."""

    def __init__(self, model: ModelSpec, group: GroupSpec, config: ChorusConfig | None = None):
        self._spec = model
        self._group = group
        self.tokenizer = load_tokenizer(resolve_model_path(model.path))
        self._max_waiting = group.max_waiting
        self._inbox: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._cancelled: set[_Sequence] = set()
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._live: list[_Sequence] = []
        self._jobs: list[_Job] = []
        self._prefilling: dict[str, _Sequence] = {}  # admitted, prompt not yet fed whole (by host key)
        self._pending = 0  # submitted, not yet admitted (inbox + waiting), for admission control
        self._stopping = False
        self._keys = itertools.count()
        # Every torch computation, loading included, runs on the engine thread. A second thread running torch ops
        # gets a second OpenMP team; with more OpenMP threads than cores libgomp stops spinning and each of a
        # forward's parallel regions waits on a futex wake-up: a decode step measured 20-30% slower.
        loaded: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(config, loaded), name=f"engine-{model.name}",
                                        daemon=True)
        self._thread.start()
        loaded.result()

    def _load(self, config: ChorusConfig | None) -> None:
        model, group = self._spec, self._group
        if group.torch_threads:
            torch.set_num_threads(group.torch_threads)
        path = resolve_model_path(model.path)
        models = config.models if config else {model.name: model}
        loader = ModelLoader(models)
        hf_model = loader.load(model.name)
        self._eos = stop_token_ids(self.tokenizer, path, hf_model.config)
        self.max_model_len = model.max_model_len or min(hf_model.config.max_position_embeddings, 4096)
        self._resolver = PlanResolver(group, self.tokenizer, self.max_model_len, models)
        # One runner (slot KV cache) per model: the base, and each distinct guide model. A stream takes one slot;
        # the base's runner keeps the hidden states its early-exit guides end at (read without a forward of theirs).
        exits = early_exits_of(models, model.name, group.guide_models)
        runners = {name: ModelRunner(hf_model if name == model.name else loader.load(name),
                                     vocab_size=len(self.tokenizer), max_slots=group.max_batch_size,
                                     max_len=self.max_model_len,
                                     exit_layers=exits.values() if name == model.name else ())
                   for name in dict.fromkeys([model.name, *group.guide_models])}
        self._device = runners[model.name].device
        self._host = LockstepHost(runners, len(self.tokenizer), base_model=model.name, exits=exits)

    # ---- the caller's side (asyncio) ----

    def info(self) -> EngineInfo:
        return EngineInfo(engine="transformers", device=self._spec.device, dtype=self._spec.dtype,
                          max_model_len=self.max_model_len)

    def strategy_support(self) -> dict[str, str | None]:
        return availability(self._group)

    def load(self) -> EngineLoad:
        with self._lock:
            return EngineLoad(running=len(self._live), waiting=self._pending,
                              kv_cache_usage=self._host.runners[self._spec.name].cache_usage())

    def _sequence(self, request: GenerationRequest, prompt_ids: list[int], plan: PlanSpec | None, seed: int,
                  events: asyncio.Queue) -> _Sequence:
        slots = self._host.slots_needed(plan, base_context=prompt_ids)
        why = self._host.unservable(slots)
        if why:
            raise FailedPrecondition(why)
        return _Sequence(
            key=f"{request.request_id}-{next(self._keys)}", request=request, prompt_ids=prompt_ids, seed=seed,
            generator=None if request.sampling.greedy else make_generator(seed, self._device),
            detokenizer=IncrementalDetokenizer(self.tokenizer.backend_tokenizer, prompt_ids),
            stops=StopStringMatcher(request.sampling.stop),
            deliver=_deliverer(asyncio.get_running_loop(), events), plan=plan, slots=slots)

    def _submit(self, item: _Sequence | _Job) -> None:
        """Queues work for the engine thread: UNAVAILABLE while shutting down, RESOURCE_EXHAUSTED when full."""
        with self._lock:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if self._pending >= self._max_waiting:
                raise ResourceExhausted(f"{self._pending} requests are waiting (max_waiting = {self._max_waiting})")
            self._pending += 1
        self._inbox.put(item)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len)
        plan = self._resolver.resolve(request, prompt_ids)
        events: asyncio.Queue = asyncio.Queue()
        sequence = self._sequence(request, prompt_ids, plan, request.sampling.request_seed(), events)
        self._submit(sequence)
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self._cancel(sequence)

    async def sample_n(self, request: GenerationRequest, n: int) -> list[GenerationChunk]:
        """n sequences admitted together: the first prefills the prompt, the others fork its KV row (a copy, no
        forward). Sample i draws from its own generator seeded with seed + i."""
        if n < 1:
            raise InvalidArgument("n", f"must be >= 1, got {n}")
        if request.strategy is not None:
            raise InvalidArgument("strategy", "sample_n draws plain samples; it takes no token-level strategy")
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len)
        seed = request.sampling.request_seed()
        queues = [asyncio.Queue() for _ in range(n)]
        family = [self._sequence(request, prompt_ids, None, (seed + i) % 2**63, queue)
                  for i, queue in enumerate(queues)]
        family[0].forks = family[1:]
        family[0].slots = sum((s.slots for s in family), collections.Counter())
        why = self._host.unservable(family[0].slots)
        if why:
            raise FailedPrecondition(f"sample_n with n = {n}: {why}")
        self._submit(family[0])
        try:
            return [await _whole_completion(queue, seed) for queue in queues]
        finally:
            self._cancel(family[0])  # no-op once all finished

    async def score_along(self, request: GenerationRequest, continuation: Sequence[int],
                          candidate_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        continuation, reads = check_reads(continuation, candidate_ids, len(self.tokenizer))
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len, reserve=len(continuation) + 1)
        return await self._run_job(request, prompt_ids + continuation, reads)

    async def loglik(self, request: GenerationRequest, continuation: Sequence[int]) -> list[float]:
        continuation = check_token_ids("continuation", continuation, len(self.tokenizer))
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len, reserve=len(continuation))
        rows = await self._run_job(request, prompt_ids + continuation[:-1], [[token] for token in continuation])
        return [row[0] for row in rows]

    async def _run_job(self, request: GenerationRequest, sequence: list[int], reads: list[list[int]]
                       ) -> list[list[float]]:
        events: asyncio.Queue = asyncio.Queue()
        job = _Job(request=request, sequence=sequence, reads=reads,
                   deliver=_deliverer(asyncio.get_running_loop(), events))
        self._submit(job)
        try:
            result = await events.get()
        finally:
            self._cancel(job)  # no-op once it ran
        if isinstance(result, BaseException):
            raise result
        return result

    def _cancel(self, item: _Sequence | _Job) -> None:
        with self._lock:
            self._cancelled.add(item)
        self._inbox.put(None)  # wake the thread if it is idle

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # ---- the engine thread ----

    def _run(self, config: ChorusConfig | None, loaded: concurrent.futures.Future) -> None:
        try:
            self._load(config)
        except BaseException as error:  # the constructor re-raises it
            loaded.set_exception(error)
            return
        loaded.set_result(None)
        try:
            while True:
                self._drain_inbox(block=not self._live and not self._waiting and not self._jobs)
                if self._stopping:
                    self._fail_all(Unavailable("the engine shut down"))
                    return
                self._drop_cancelled_and_expired()
                self._admit()
                self._run_jobs()
                self._step()
        except Exception as error:  # a bug or a device failure: fail every request loudly, never hang them
            log.exception("engine thread failed")
            self._fail_all(Unavailable(f"engine failure: {error!r}"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, _Job):
                    self._jobs.append(item)
                elif item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _drop_cancelled_and_expired(self) -> None:
        now = time.time()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for item in [*self._waiting, *self._live, *self._jobs]:
            if item.done:  # a sample_n fork retired with its family below
                continue
            deadline = item.request.deadline
            family = item.family if isinstance(item, _Sequence) else [item]
            if item in cancelled:
                for member in family:
                    self._retire(member)
            elif deadline is not None and now >= deadline:
                for member in family:
                    done = f"after {len(member.generated)} tokens" if isinstance(member, _Sequence) else "before it ran"
                    self._retire(member)
                    member.deliver(DeadlineExceeded(f"deadline passed {done}"))

    def _admit(self) -> None:
        """Admits waiting sequences in order while their slots are free; their prompts (and their plans' contexts)
        are prefilled in chunks by the following steps. The forks of a sample_n family still prefilling open their
        slots only when its prefill completes: those slots are held for them meanwhile."""
        while self._waiting and self._host.fits(self._waiting[0].slots + self._held_for_forks()):
            leader = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            self._host.add(leader.key, leader.plan, base_context=leader.prompt_ids, prefill_now=False)
            leader.live = True
            leader.admitted_at = time.time()
            self._live.append(leader)
            self._prefilling[leader.key] = leader

    def _held_for_forks(self) -> collections.Counter:
        return collections.Counter({self._host.base_model: sum(len(s.forks) for s in self._prefilling.values())})

    def _run_jobs(self) -> None:
        """Score and loglik jobs, in arrival order, batched into forwards of at most JOB_ROWS distributions and
        JOB_TOKENS tokens."""
        while self._jobs:
            batch, width, longest = [], 0, 0
            for job in self._jobs:
                rows = len(batch) + 1
                if batch and (max(width, job.keep) * rows > JOB_ROWS
                              or max(longest, len(job.sequence)) * rows > JOB_TOKENS):
                    break
                batch.append(job)
                width, longest = max(width, job.keep), max(longest, len(job.sequence))
            log_probs = self._host.runners[self._spec.name].tail_log_probs([job.sequence for job in batch], width)
            for job, row in zip(batch, log_probs):
                self._retire(job)
                job.deliver(_read(row[-job.keep:], job.reads))

    def _step(self) -> None:
        """One step within the token budget: a token for every decoding sequence (one row each), and the rest of
        the budget for prompt chunks of the prefilling ones; a sequence whose prefill completes samples its first
        token in the same step (with a sample_n family's forks, copies of its prefilled KV rows)."""
        decoding = [seq for seq in self._live if seq.decoding]
        ready = []
        if self._prefilling:
            for key in self._host.prefill(self._group.max_step_tokens - len(decoding)):
                leader = self._prefilling.pop(key)
                for fork in leader.forks:
                    self._host.fork(leader.key, fork.key)
                    fork.live = True
                    fork.admitted_at = leader.admitted_at
                    self._live.append(fork)
                ready += leader.family
        for seq in ready:
            seq.decoding = True
        if decoding or ready:
            self._sample(decoding + ready)

    def _sample(self, seqs: list[_Sequence]) -> None:
        """One token for each of `seqs` from its fused scores after its generated tokens."""
        scores = self._host.step([(seq.key, seq.generated) for seq in seqs])
        tokens = sample(scores, [s.sampling for s in seqs], [s.generator for s in seqs]).tolist()
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        if len(seq.generated) == 1:
            seq.first_token_at = time.time()
        sampling = seq.sampling
        if token in self._eos and not sampling.ignore_eos:
            return self._finish(seq, "stop", seq.stops.flush(), [token])
        text, hit_stop = seq.stops.push(seq.detokenizer.push(token))
        if hit_stop:
            return self._finish(seq, "stop", text, [token])
        if len(seq.generated) >= sampling.max_tokens:  # the context was checked against max_tokens on entry
            return self._finish(seq, "length", text + seq.stops.flush(), [token])
        seq.deliver(GenerationChunk(text=text, token_ids=[token]))

    def _finish(self, seq: _Sequence, reason: str, text: str, token_ids: list[int]) -> None:
        usage = Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.generated),
                      forward_passes=self._host.forward_passes(seq.key))
        plan = self._host.plan(seq.key)
        self._retire(seq)
        seq.deliver(GenerationChunk(text=text, token_ids=token_ids, finish_reason=reason, usage=usage,
                                    seed=seq.seed, report=plan.report() if plan else None,
                                    phases=PhaseTimes(seq.admitted_at, seq.first_token_at)))

    def _retire(self, item: _Sequence | _Job) -> None:
        """Drops finished, cancelled or expired work (a live sequence's slots free at once)."""
        if item.done:
            return
        item.done = True
        if isinstance(item, _Job):
            self._jobs.remove(item)
        elif item.live:
            self._host.remove(item.key, park=False)
            self._live.remove(item)
            self._prefilling.pop(item.key, None)
            return
        elif item in self._waiting:  # its sample_n forks were never admitted
            self._waiting.remove(item)
        else:  # a sample_n fork whose family is retired before its prefill completed: nothing holds it
            return
        with self._lock:
            self._pending -= 1

    def _fail_all(self, error: Exception) -> None:
        for item in [*self._waiting, *self._live, *self._jobs]:
            if item.done:
                continue
            # A sequence not yet decoding answers for its sample_n forks, which nothing else holds yet.
            members = [item] if isinstance(item, _Job) or item.decoding else item.family
            for member in members:
                self._retire(member)
                member.deliver(error)
