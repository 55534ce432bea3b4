"""Companion requests: a plan's streams on the base model under another context run as rows of vLLM's own batch.

A request whose plan reads the base model on other contexts (logit fusion's in-context experts, USCD's lame prompt,
STEER's negative context) is sent to vLLM as a group of requests, its members: member 0 on the request's prompt, one
companion per such stream on that stream's context. The fusion logits processor (server/engines/vllm_fusion.py)
decides the group's next token only in a step where every member of the group is a row of the batch: it fuses the
members' logits rows with the plan, samples the token with the request's own generator and writes it one-hot into
every member's row, so all members append the same token and stay on the same position. The token reaches the
engine over the report socket; the engine streams it to the client (its own detokenizer and stop strings) and aborts
the members when the request ends.

Keeping the members in lock-step is the scheduler's job (`GangScheduler`, vLLM's FCFS scheduler with a pass before
each `schedule()`), with two mechanisms vLLM offers:
  - hold: a running member ready to decode is skipped for one step (`next_decode_eligible_step`, as vLLM's own
    diffusion scheduler does) unless every member of its group is ready to decode: a group decodes all together or
    not at all. While no member is ready (all are prefilling, or waiting to be admitted), one of them is held back,
    so that no step has every member in it while one of them is only a partial prefill chunk (whose logits the
    processor cannot tell apart from a complete one's).
  - roll back: a member that sampled without its whole group (its prefill completed alone, or vLLM preempted or did
    not schedule a sibling) has a token the processor did not decide. Before the next step it is taken back: the
    token leaves the request's output and the position before it is computed again (vLLM's model runner truncates its
    cached output tokens when the scheduler reports fewer, as it does after a failed KV load). The member is then
    ready to decode and waits for its group.
Each roll-back costs the member one wasted row; none changes a decided token, so the output equals the naive
reference however vLLM admits, chunks or preempts the members. The processor counts the steps where a group was
incomplete; the response's usage reports them (`companion_waits`).

Admission and liveness: first come, first served, counting sequence slots. A group's waiting members are admitted
all in the same step, once every member has arrived, or not yet, so groups do not hold sequence slots waiting for
siblings that cannot get one; a complete group that does not fit keeps everything queued behind it (plain requests
and other groups) waiting, so later arrivals cannot take the slots it waits for one at a time; requests kept out of
a step keep their place in the queue. When a step schedules nothing while a group's running members wait for queued
siblings (their KV blocks are held by other waiting groups), the latest such group is preempted whole and its
members queued again at the back, together.

Written against vLLM 0.32's V1 scheduler: the roll-back edits a Request's token lists, which are vLLM internals.
Requirements, checked by the engine: vLLM's synchronous scheduler (no async scheduling: it would sample a member's
next token before the roll-back) with the FCFS policy, and the V1 model runner (the processor adapter that tracks
member rows). Members never stop on their own (`ignore_eos`, no stop strings, max_tokens one above the request's),
so that only the engine ends a group.
"""

from __future__ import annotations

import time

try:
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.core.sched.scheduler import Scheduler as _Scheduler
    from vllm.v1.request import RequestStatus
except ImportError:  # no vLLM installed: the transformers engine does not need the scheduler
    _Scheduler = object
    PauseState = RequestStatus = None

MEMBER_ARG = "chorus_member"  # in SamplingParams.extra_args: {"group": key, "index": i, "size": n}


def member_of(sampling_params) -> tuple[str, int, int] | None:
    """(group key, member index, group size) of a member request, None for any other request."""
    args = (sampling_params.extra_args or {}) if sampling_params is not None else {}
    member = args.get(MEMBER_ARG)
    if member is None:
        return None
    return member["group"], member["index"], member["size"]


def check_member(sampling_params) -> None:
    """Raises ValueError for a malformed member argument (the processor's validate_params calls it)."""
    args = sampling_params.extra_args or {}
    if MEMBER_ARG not in args:
        return
    member = args[MEMBER_ARG]
    if not (isinstance(member, dict) and isinstance(member.get("group"), str)
            and isinstance(member.get("index"), int) and isinstance(member.get("size"), int)
            and 0 <= member["index"] < member["size"]):
        raise ValueError(f"extra_args[{MEMBER_ARG!r}] must be {{'group': str, 'index': i, 'size': n}} with "
                         f"0 <= i < n, got {member!r}")


class GangScheduler(_Scheduler):
    """vLLM's scheduler, with the members of each group held and rolled back so that they sample together."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._groups: dict[str, dict[int, object]] = {}  # group key → member index → vLLM Request, in arrival order
        self._sizes: dict[str, int] = {}
        self._stalled = False  # the last step scheduled nothing while groups were held
        self._queued: dict = {}  # request id → the queue holding it, as schedule() began

    def add_request(self, request) -> None:
        super().add_request(request)
        member = member_of(request.sampling_params)
        if member is not None:
            group, index, size = member
            self._groups.setdefault(group, {})[index] = request
            self._sizes[group] = size

    def schedule(self, *args, **kwargs):
        deferred: dict[str, tuple] = {}  # request id → (its queue, request): kept out of this step's admissions
        self._queued = {r.request_id: q for q in (self.kv_holding_waiting, self.waiting) for r in q}
        starved = []  # complete groups with members running (held) and members queued
        for group in list(self._groups):
            members = self._members(group)
            if not members:
                del self._groups[group], self._sizes[group]
                continue
            complete = len(members) == self._sizes[group]
            for queue, request in self._align(members, complete):
                deferred[request.request_id] = (queue, request)
            queued = [r for r in members if r.request_id in self._queued]
            if complete and queued and len(queued) < len(members):
                starved.append(members)
        self._admit(deferred)
        if self._stalled and starved and self._pause_state == PauseState.UNPAUSED:
            # Nothing ran last step while a group's running members waited for queued siblings that cannot be
            # admitted (KV blocks held by waiting groups): the latest such group gives its blocks back, and its
            # members queue again at the back, none admitted in this step.
            for request in starved[-1]:
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                    self._preempt_request(request, time.monotonic())
                    self._queued[request.request_id] = self.waiting
                if self._queued.get(request.request_id) is self.waiting:  # the whole group, together
                    self.waiting.remove_request(request)
                    self.waiting.add_request(request)
                if request.request_id in self._queued:
                    deferred[request.request_id] = (self._queued[request.request_id], request)
        order = {id(queue): list(queue) for queue in (self.waiting, self.kv_holding_waiting)}
        for queue in (self.waiting, self.kv_holding_waiting):
            queue.remove_requests([r for q, r in deferred.values() if q is queue])  # one linear pass a queue
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for queue in (self.waiting, self.kv_holding_waiting):
                self._restore_order(queue, order[id(queue)],
                                    {r for q, r in deferred.values() if q is queue and r.request_id in self.requests})
        self._stalled = output.total_num_scheduled_tokens == 0 and bool(starved)
        return output

    def _members(self, group: str) -> list:
        return [r for r in self._groups[group].values() if r.request_id in self.requests]

    def _admit(self, deferred: dict) -> None:
        """First come, first served over the queues in the order vLLM admits from them, counting sequence slots: a
        group's queued members are admitted all in the same step, once every member has arrived, or not at all
        (members admitted apart would hold slots waiting for their siblings); a complete group that does not fit
        keeps everything queued behind it, plain requests and other groups, out of the step, so that the slots it
        waits for are not taken by later arrivals. Adds the requests kept out to `deferred`."""
        free = self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
        blocked, seen = False, set()
        for queue in (self.kv_holding_waiting, self.waiting):
            for request in queue:
                member = member_of(request.sampling_params)
                if member is None:
                    if blocked or free <= 0:  # free <= 0: the slots left are an earlier group's (one member may be
                        deferred.setdefault(request.request_id, (queue, request))  # held out of this step)
                    free -= 1
                    continue
                group = member[0]
                if group in seen or group not in self._groups:
                    continue
                seen.add(group)
                members = self._members(group)
                queued = [(self._queued[r.request_id], r) for r in members if r.request_id in self._queued]
                complete = len(members) == self._sizes[group]
                if complete and not blocked and len(queued) <= free:
                    free -= len(queued)
                else:
                    deferred.update((r.request_id, (q, r)) for q, r in queued)
                    blocked = blocked or complete

    @staticmethod
    def _restore_order(queue, before: list, deferred: set) -> None:
        """Puts the requests kept out of the step back where they were in `queue`: the requests vLLM put in it
        during the step (preempted ones, at the front) first, then the others in their order before the step."""
        current = list(queue)
        known = set(before)
        kept = set(current) | deferred
        queue.clear()
        queue.extend([r for r in current if r not in known] + [r for r in before if r in kept])

    @staticmethod
    def _all_ready(members: list, complete: bool) -> bool:
        return complete and all(r.status == RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1
                                for r in members)

    def _align(self, members: list, complete: bool) -> list:
        """Rolls back the members ahead of the others, then holds members so that the group's members sample in the
        same step or not at all. Returns the (queue, request) of a waiting member to keep out of this step."""
        behind = min(r.num_output_tokens for r in members)
        for request in members:
            while request.num_output_tokens > behind:
                self._roll_back(request)
        if self._all_ready(members, complete):
            return []
        ready = [r for r in members if r.status == RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1]
        hold, deferred = ready, []
        if not ready and complete:
            # Every member prefills or waits: keep one of them out of this step, so that a step with every member in
            # it has each of them ready to decode. A running one is held like a ready one; a waiting one is taken
            # out of its queue for this call.
            running = [r for r in members if r.status == RequestStatus.RUNNING]
            hold = running[-1:]
            if not running and members[-1].request_id in self._queued:
                deferred = [(self._queued[members[-1].request_id], members[-1])]
        for request in hold:
            # schedule() advances current_step before it reads eligibility: current_step + 2 skips this call only.
            request.next_decode_eligible_step = max(request.next_decode_eligible_step, self.current_step + 2)
        return deferred

    def _roll_back(self, request) -> None:
        """Takes back the request's last output token (a sample its group did not take): it leaves the output, and
        the position before it is computed again at the next step the request runs."""
        request._output_token_ids.pop()
        request._all_token_ids.pop()
        del request.block_hashes[request.num_tokens // self.hash_block_size:]
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
