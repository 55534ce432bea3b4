"""Transformers engine: continuous batching at step granularity over a slot KV cache.

One engine thread owns the model. Each iteration it
  1. drops cancelled and expired sequences (their slots free at once),
  2. admits waiting requests while slots are free: one prefill forward each, which also yields their first token,
  3. runs one batched decode forward for all live sequences and samples one token per row,
  4. streams each sequence's new text (incremental detokenization, stop strings) to its caller.
Requests join and leave between steps; nobody waits for a batch to drain. Callers live on asyncio loops (the
Ray Serve replica's); the thread hands chunks to them with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import AsyncIterator, Callable

import torch

from decoding.sampling import SamplingParams, make_generator, sample
from decoding.text import IncrementalDetokenizer, StopStringMatcher
from server.config import GroupSpec, ModelSpec
from server.engines.base import (Engine, EngineInfo, EngineLoad, GenerationChunk, GenerationRequest, Usage)
from server.engines.prompts import load_tokenizer, prompt_token_ids
from server.engines.runner import ModelRunner, Slot
from server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
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
    slot: Slot | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    forward_passes: int = 0
    done: bool = False

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


class TransformersEngine(Engine):
    def __init__(self, model: ModelSpec, group: GroupSpec):
        from transformers import AutoModelForCausalLM, GenerationConfig

        if group.torch_threads:
            torch.set_num_threads(group.torch_threads)
        path = resolve_model_path(model.path)
        self._spec = model
        self.tokenizer = load_tokenizer(path)
        dtype = getattr(torch, model.dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(model.device).eval()
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        self._eos = stop_token_ids(self.tokenizer, hf_model.config, generation_config)
        self.max_model_len = model.max_model_len or min(hf_model.config.max_position_embeddings, 4096)
        self._runner = ModelRunner(hf_model, vocab_size=len(self.tokenizer), max_slots=group.max_batch_size,
                                   max_len=self.max_model_len)
        self._max_waiting = group.max_waiting
        self._inbox: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._cancelled: set[_Sequence] = set()
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._live: list[_Sequence] = []
        self._pending = 0  # submitted, not yet admitted (inbox + waiting), for admission control
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{model.name}", daemon=True)
        self._thread.start()

    # ---- the caller's side (asyncio) ----

    def info(self) -> EngineInfo:
        return EngineInfo(engine="transformers", device=self._spec.device, dtype=self._spec.dtype,
                          max_model_len=self.max_model_len)

    def load(self) -> EngineLoad:
        with self._lock:
            return EngineLoad(running=len(self._live), waiting=self._pending)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        sampling = request.sampling
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.max_model_len)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        sequence = _Sequence(
            request=request, prompt_ids=prompt_ids, seed=seed,
            generator=None if sampling.greedy else make_generator(seed, self._runner.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer.backend_tokenizer, prompt_ids),
            stops=StopStringMatcher(sampling.stop),
            deliver=_deliverer(loop, events))
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

    def _run(self) -> None:
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

    def _admit(self) -> None:
        while self._waiting and self._runner.free_slots:
            seq = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            seq.slot = self._runner.open()
            self._live.append(seq)
            logits = self._runner.extend(seq.slot, seq.prompt_ids)
            seq.forward_passes += 1
            token = sample(logits.unsqueeze(0), [seq.sampling], [seq.generator])
            self._accept(seq, int(token[0]))

    def _decode_step(self) -> None:
        live = self._live
        logits = self._runner.decode([s.slot for s in live], [s.generated[-1] for s in live])
        tokens = sample(logits, [s.sampling for s in live], [s.generator for s in live]).tolist()
        for seq, token in zip(list(live), tokens):
            seq.forward_passes += 1
            self._accept(seq, token)

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
                      forward_passes={self._spec.name: seq.forward_passes})
        self._retire(seq)
        seq.deliver(GenerationChunk(text=text, token_ids=token_ids, finish_reason=reason, usage=usage,
                                    seed=seq.seed))

    def _retire(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot is not None:
            self._runner.close(seq.slot)
            self._live.remove(seq)
        else:
            self._waiting.remove(seq)
            with self._lock:
                self._pending -= 1

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self._waiting) + list(self._live):
            self._retire(seq)
            seq.deliver(error)
