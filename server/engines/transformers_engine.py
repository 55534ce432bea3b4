"""Transformers engine: continuous batching at step granularity over slot KV caches, lock-step across models.

One engine thread owns the base model and its guides (one ModelRunner, i.e. one slot KV cache, per model). A request
is one sequence on the base model plus, for a token-level strategy, the extra streams of its plan (a guide on the
prompt, the base on a lame/negative context, in-context experts), each in its own slot. Each iteration the thread
  1. drops cancelled and expired sequences (their slots free at once),
  2. admits waiting requests while every model they need has free slots: one prefill forward per stream, which also
     yields their first token,
  3. runs one batched decode forward per model for all live streams of all requests, hands each request's rows to
     its plan (fusion math, decoding/plans.py) and samples one token per request from the fused scores,
  4. streams each sequence's new text (incremental detokenization, stop strings) to its caller.
Requests join and leave between steps; nobody waits for a batch to drain. Callers live on asyncio loops (the
Ray Serve replica's); the thread hands chunks to them with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import AsyncIterator, Callable

import torch

from decoding.plans import Plan
from decoding.sampling import SamplingParams, make_generator, sample
from decoding.text import IncrementalDetokenizer, StopStringMatcher
from server.config import ChorusConfig, GroupSpec, ModelSpec
from server.engines.base import (Engine, EngineInfo, EngineLoad, GenerationChunk, GenerationRequest, Usage)
from server.lockstep.guides import ModelLoader
from server.strategies.registry import PlanResolver, availability
from server.engines.prompts import load_tokenizer, prompt_token_ids
from server.lockstep.runner import ModelRunner, Slot, decode_streams
from server.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, Unavailable
from server.models import resolve_model_path

log = logging.getLogger(__name__)

def stop_token_ids(tokenizer, model_config, generation_config) -> frozenset[int]:
    ids = set()
    for source in (generation_config, model_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


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
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    deliver: Callable[[object], None]
    plan: Plan | None = None
    # (model name, context ids) of every stream: the base on the prompt first, then the plan's extra streams.
    contexts: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)
    # One slot per entry of `contexts` while the sequence is live.
    slots: list[Slot] = dataclasses.field(default_factory=list)
    # Plan stream i → its row in this sequence's per-step logits (0 = the base's own, reused).
    stream_rows: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    forward_passes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    done: bool = False

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


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
        self._pending = 0  # submitted, not yet admitted (inbox + waiting), for admission control
        self._stopping = False
        # Every torch computation, loading included, runs on the engine thread. A second thread running torch ops
        # gets a second OpenMP team; with more OpenMP threads than cores libgomp stops spinning and each of a
        # forward's parallel regions waits on a futex wake-up: a decode step measured 20-30% slower.
        loaded: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(config, loaded), name=f"engine-{model.name}",
                                        daemon=True)
        self._thread.start()
        loaded.result()

    def _load(self, config: ChorusConfig | None) -> None:
        from transformers import GenerationConfig

        model, group = self._spec, self._group
        if group.torch_threads:
            torch.set_num_threads(group.torch_threads)
        path = resolve_model_path(model.path)
        loader = ModelLoader(config.models if config else {model.name: model})
        hf_model = loader.load(model.name)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        self._eos = stop_token_ids(self.tokenizer, hf_model.config, generation_config)
        self.max_model_len = model.max_model_len or min(hf_model.config.max_position_embeddings, 4096)
        self._resolver = PlanResolver(group, self.tokenizer, self.max_model_len)
        # One runner (slot KV cache) per model: the base, and each distinct guide model. A stream takes one slot.
        self._runners = {name: ModelRunner(hf_model if name == model.name else loader.load(name),
                                           vocab_size=len(self.tokenizer), max_slots=group.max_batch_size,
                                           max_len=self.max_model_len)
                         for name in dict.fromkeys([model.name, *group.guide_models])}
        self._runner = self._runners[model.name]

    # ---- the caller's side (asyncio) ----

    def info(self) -> EngineInfo:
        return EngineInfo(engine="transformers", device=self._spec.device, dtype=self._spec.dtype,
                          max_model_len=self.max_model_len)

    def strategy_support(self) -> dict[str, str | None]:
        return availability(self._group)

    def load(self) -> EngineLoad:
        with self._lock:
            return EngineLoad(running=len(self._live), waiting=self._pending)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        sampling = request.sampling
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len)
        plan_spec = self._resolver.resolve(request, prompt_ids)
        contexts = [(self._spec.name, prompt_ids)]
        stream_rows = []
        for stream in plan_spec.streams if plan_spec else ():
            if stream.model is None:
                stream_rows.append(0)
            else:
                contexts.append((stream.model, list(stream.ids)))
                stream_rows.append(len(contexts) - 1)
        for name, need in collections.Counter(name for name, _ in contexts).items():
            if need > self._runners[name].cache.num_slots:
                raise FailedPrecondition(f"this strategy needs {need} KV-cache slots on model {name!r}; the group's "
                                         f"max_batch_size is {self._runners[name].cache.num_slots}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        sequence = _Sequence(
            request=request, prompt_ids=prompt_ids, seed=seed,
            generator=None if sampling.greedy else make_generator(seed, self._runner.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer.backend_tokenizer, prompt_ids),
            stops=StopStringMatcher(sampling.stop),
            deliver=_deliverer(loop, events),
            plan=plan_spec.build() if plan_spec else None, contexts=contexts, stream_rows=stream_rows)
        with self._lock:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if self._pending >= self._max_waiting:
                raise ResourceExhausted(f"{self._pending} requests are waiting (max_waiting = {self._max_waiting})")
            self._pending += 1
        self._inbox.put(sequence)
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

    def _cancel(self, sequence: _Sequence) -> None:
        with self._lock:
            self._cancelled.add(sequence)
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
                self._drain_inbox(block=not self._live and not self._waiting)
                if self._stopping:
                    self._fail_all(Unavailable("the engine shut down"))
                    return
                self._drop_cancelled_and_expired()
                self._admit()
                if self._live:
                    self._decode_step()
        except Exception as error:  # a bug or a device failure: fail every request loudly, never hang them
            log.exception("engine thread failed")
            self._fail_all(Unavailable(f"engine failure: {error!r}"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _drop_cancelled_and_expired(self) -> None:
        now = time.time()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for seq in list(self._waiting) + list(self._live):
            deadline = seq.request.deadline
            if seq in cancelled:
                self._retire(seq)
            elif deadline is not None and now >= deadline:
                self._retire(seq)
                seq.deliver(DeadlineExceeded(f"deadline passed after {len(seq.generated)} tokens"))

    def _fits(self, seq: _Sequence) -> bool:
        need = collections.Counter(name for name, _ in seq.contexts)
        return all(self._runners[name].free_slots >= n for name, n in need.items())

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0]):
            seq = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            self._live.append(seq)
            rows = []
            for name, ids in seq.contexts:
                slot = self._runners[name].open()
                seq.slots.append(slot)
                rows.append(self._runners[name].extend(slot, ids))
                seq.forward_passes[name] += 1
            scores = self._fuse(seq, torch.stack(rows))
            self._accept(seq, self._choose(scores.unsqueeze(0), [seq])[0])

    def _decode_step(self) -> None:
        live = self._live
        streams = []
        for seq in live:
            for (name, _), slot in zip(seq.contexts, seq.slots):
                streams.append((name, slot, seq.generated[-1]))
                seq.forward_passes[name] += 1
        rows = iter(decode_streams(self._runners, streams))
        scores = torch.stack([self._fuse(seq, torch.stack([next(rows) for _ in seq.slots])) for seq in live])
        for seq, token in zip(list(live), self._choose(scores, live)):
            self._accept(seq, token)

    @staticmethod
    def _fuse(seq: _Sequence, rows: torch.Tensor) -> torch.Tensor:
        """The sequence's next-token scores from its streams' logits rows (row 0: the base on the prompt)."""
        if seq.plan is None:
            return rows[0]
        return seq.plan.step(rows[0], rows[seq.stream_rows], len(seq.generated))

    @staticmethod
    def _choose(scores: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        tokens = sample(scores, [s.sampling for s in seqs], [s.generator for s in seqs]).tolist()
        for i, seq in enumerate(seqs):
            forced = seq.plan.forced_token(len(seq.generated)) if seq.plan else None
            if forced is not None:
                tokens[i] = forced
        return tokens

    def _accept(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
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
                      forward_passes=dict(seq.forward_passes))
        self._retire(seq)
        seq.deliver(GenerationChunk(text=text, token_ids=token_ids, finish_reason=reason, usage=usage,
                                    seed=seq.seed, report=seq.plan.report() if seq.plan else None))

    def _retire(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slots:
            for (name, _), slot in zip(seq.contexts, seq.slots):
                self._runners[name].close(slot)
            self._live.remove(seq)
        else:
            self._waiting.remove(seq)
            with self._lock:
                self._pending -= 1

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self._waiting) + list(self._live):
            self._retire(seq)
            seq.deliver(error)
