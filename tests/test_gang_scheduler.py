"""The gang scheduler of companion requests (server/engines/vllm_companions.py) on vLLM's real V1 scheduler, without
a model: each step's scheduler output goes to a stand-in model runner that samples like the fusion processor (a
group's token when every member samples in the step, a stray token otherwise), and back through vLLM's own
`update_from_output`. What the engine tests cannot pin down step by step: members sample together or not at all,
never with one of them a partial prefill chunk, whatever vLLM's chunked prefill does; a group is admitted whole; a
group that does not fit keeps later arrivals (plain requests too) from taking its slots one at a time; requests
kept out of a step keep their place in the queue."""

import itertools
import time

import pytest

from server.engines.vllm_companions import MEMBER_ARG, GangScheduler

STRAY = -1  # what a member's row samples when its group is not all in the step (the scheduler must roll it back)


def make_scheduler(model_path, max_num_seqs: int, max_num_batched_tokens: int = 256, num_blocks: int = 256):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    cache = CacheConfig(block_size=16)
    cache.num_gpu_blocks = num_blocks
    config = VllmConfig(
        model_config=ModelConfig(model=model_path, max_model_len=512, dtype="float32"),
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                         max_model_len=512, is_encoder_decoder=False, enable_chunked_prefill=True),
        cache_config=cache)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    scheduler = GangScheduler(vllm_config=config, kv_cache_config=kv,
                              structured_output_manager=StructuredOutputManager(config), block_size=16)
    # Prefix caching on, as in the engine: requests carry block hashes (which a roll-back trims).
    hash_fn = get_hash_fn_by_name(cache.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    scheduler.block_hasher = get_request_block_hasher(16, hash_fn)
    return scheduler


_arrivals = itertools.count()


def add(scheduler, request_id: str, prompt_len: int, member: dict | None = None, max_tokens: int = 64):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={MEMBER_ARG: member} if member else None)
    arrival = next(_arrivals)
    request = Request(request_id, [1, 2, 3] + [arrival * 100 + i for i in range(prompt_len - 3)], params, None,
                      arrival_time=time.time() + arrival * 1e-3, block_hasher=scheduler.block_hasher)
    scheduler.add_request(request)
    return request


def add_group(scheduler, key: str, prompt_lens: list[int], max_tokens: int = 64) -> list:
    """Members as the engine sends them: one token past the request's max_tokens (only the engine ends a group)."""
    return [add(scheduler, f"{key}-m{i}", n, {"group": key, "index": i, "size": len(prompt_lens)}, max_tokens + 1)
            for i, n in enumerate(prompt_lens)]


def step(scheduler, groups: dict[str, list]):
    """One engine step: schedule, then the stand-in runner. A request samples when its prefill is complete after
    the step (vLLM advances num_computed_tokens at schedule time); a group's members get the group's token (the
    step number) only when all of them sample in the step, as the processor decides, else STRAY."""
    from vllm.v1.outputs import ModelRunnerOutput

    output = scheduler.schedule()
    scheduled = output.num_scheduled_tokens
    samples = {rid: scheduler.requests[rid].num_computed_tokens >= scheduler.requests[rid].num_tokens
               for rid in scheduled}
    tokens = {rid: [STRAY] if sampling else [] for rid, sampling in samples.items()}
    for members in groups.values():
        ids = [m.request_id for m in members]
        if all(samples.get(rid) for rid in ids):
            for rid in ids:
                tokens[rid] = [scheduler.current_step]
    ids = list(scheduled)
    scheduler.update_from_output(output, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
        sampled_token_ids=[tokens[rid] for rid in ids]))
    return scheduled, samples


@pytest.mark.parametrize("prompt_lens", [[8, 8, 8], [8, 40, 90], [90, 8], [30, 30, 30, 30]])
def test_members_sample_together_never_beside_a_partial_prefill(model_path, prompt_lens):
    """A token budget of 32 a step cuts the longer prompts into chunks. Whenever every member is in a step, each of
    them samples (none is a partial chunk, whose logits the processor could not tell apart); after each schedule()
    the members' outputs are equal and hold only decided tokens; the group goes on decoding every step once aligned."""
    scheduler = make_scheduler(model_path, max_num_seqs=8, max_num_batched_tokens=32)
    members = add_group(scheduler, "g", prompt_lens)
    together = 0
    for _ in range(60):
        scheduled, samples = step(scheduler, {"g": members})
        in_step = [m.request_id in scheduled for m in members]
        if all(in_step):
            assert all(samples[m.request_id] for m in members), "every member in a step, one of them a chunk"
            together += 1
        if together >= 8:
            break
    scheduler.schedule()  # rolls back any member ahead
    outputs = [list(m.output_token_ids) for m in members]
    assert outputs[0] == outputs[1] == outputs[-1] and STRAY not in outputs[0]
    assert len(outputs[0]) == together >= 8, outputs
    assert outputs[0] == sorted(outputs[0]) and len(set(outputs[0])) == len(outputs[0])  # one token per step


def test_a_group_that_does_not_fit_keeps_later_arrivals_waiting(model_path):
    """Four sequence slots, two plain requests running: a group of three cannot start, and a plain request that
    arrives after it does not take a free slot (it would, one at a time, keep the group out for as long as plain
    requests keep coming). When a running request ends, the group starts whole; the later request waits for a slot."""
    scheduler = make_scheduler(model_path, max_num_seqs=4)
    running = [add(scheduler, f"early-{i}", 8) for i in range(2)]
    step(scheduler, {})
    assert all(r.request_id in scheduler.requests and r in scheduler.running for r in running)
    members = add_group(scheduler, "g", [8, 8, 8])
    late = add(scheduler, "late", 8)
    for _ in range(3):
        scheduled, _ = step(scheduler, {"g": members})
        assert set(scheduled) == {"early-0", "early-1"}
        assert list(scheduler.waiting) == [*members, late]  # kept out, in their places
    from vllm.v1.request import RequestStatus
    scheduler.finish_requests("early-0", RequestStatus.FINISHED_ABORTED)
    scheduled, _ = step(scheduler, {"g": members})
    # The group admitted whole, one member held back a step (no step with every member prefilling); its slot is
    # kept for it.
    assert set(scheduled) == {"early-1", "g-m0", "g-m1"} and list(scheduler.waiting) == [members[2], late]
    scheduled, _ = step(scheduler, {"g": members})
    assert "g-m2" in scheduled and list(scheduler.waiting) == [late]


def test_plain_requests_ahead_of_a_group_go_first(model_path):
    """First come, first served: a plain request queued before a group takes its slot first; the group starts when
    the slots it needs are free, and the plain request queued after it still waits."""
    scheduler = make_scheduler(model_path, max_num_seqs=3)
    add(scheduler, "first", 8)
    members = add_group(scheduler, "g", [8, 8])
    late = add(scheduler, "late", 8)
    scheduled, _ = step(scheduler, {"g": members})
    assert set(scheduled) == {"first", "g-m0"}  # the group admitted (its second member held back a step)
    assert list(scheduler.waiting) == [members[1], late]
    scheduled, _ = step(scheduler, {"g": members})
    assert set(scheduled) == {"first", "g-m1"} and list(scheduler.waiting) == [late]


def run_to_the_end(scheduler, groups: dict[str, list], max_tokens: int, steps: int = 3000) -> tuple[dict, bool]:
    """Steps until every request is done, ending each group as the engine does once its members hold max_tokens
    decided tokens. Returns each group's members' outputs at its end, and whether the stall breaker fired."""
    from vllm.v1.request import RequestStatus

    ended, stalled = {}, False
    for _ in range(steps):
        if not scheduler.requests:
            break
        step(scheduler, groups)
        stalled = stalled or scheduler._stalled
        for key, members in groups.items():
            if key not in ended and all(len(m.output_token_ids) >= max_tokens for m in members):
                ended[key] = [list(m.output_token_ids) for m in members]
                scheduler.finish_requests([m.request_id for m in members], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.requests, f"still unfinished after {steps} steps: {sorted(scheduler.requests)}"
    return ended, stalled


def assert_only_decided_tokens(ended: dict, max_tokens: int) -> None:
    for key, outputs in ended.items():
        decided = outputs[0][:max_tokens]
        assert all(o[:max_tokens] == decided for o in outputs) and STRAY not in decided, (key, outputs)


def test_groups_under_kv_pressure_all_finish_with_only_decided_tokens(model_path):
    """KV blocks for about half of what the running sequences need: vLLM preempts members mid-decode (the scheduler
    rolls back the lone samples and re-admits the member). Every group still ends, each member with the same
    tokens, all of them decided ones, beside a plain request."""
    scheduler = make_scheduler(model_path, max_num_seqs=8, max_num_batched_tokens=64, num_blocks=14)
    # 13 usable blocks of 16 tokens; the largest group needs 11 of them at its end (prompts + 25 tokens each).
    groups = {key: add_group(scheduler, key, lens, max_tokens=24)
              for key, lens in (("a", [20, 36]), ("b", [30, 20, 25]), ("c", [40, 18]))}
    add(scheduler, "plain", 30, max_tokens=24)
    ended, _ = run_to_the_end(scheduler, groups, 24)
    assert sorted(ended) == ["a", "b", "c"]
    assert max(r.num_preemptions for ms in groups.values() for r in ms) > 0  # the pressure did preempt members
    assert_only_decided_tokens(ended, 24)


def test_the_stall_breaker_frees_groups_that_hold_each_others_blocks(model_path):
    """Two groups of two 40-token prompts and 6 usable blocks of 16 tokens: each group fits alone (3 + 3 blocks at
    its end, 4 tokens), not both at once. vLLM admits members of both, runs out of blocks, and every running member
    waits for a queued sibling: a step schedules nothing. The stall breaker preempts the later group whole; both
    groups end with only decided tokens."""
    scheduler = make_scheduler(model_path, max_num_seqs=8, num_blocks=7)
    groups = {key: add_group(scheduler, key, [40, 40], max_tokens=4) for key in ("a", "b")}
    ended, stalled = run_to_the_end(scheduler, groups, 4, steps=200)
    assert stalled, "the scenario no longer stalls: the stall breaker goes untested"
    assert sorted(ended) == ["a", "b"]
    assert_only_decided_tokens(ended, 4)


@pytest.mark.parametrize("vllm_args, key", [
    ({"scheduling_policy": "priority"}, "scheduling_policy"), ({"async_scheduling": True}, "async_scheduling"),
    ({"scheduler_cls": "my.Scheduler"}, "scheduler_cls"), ({"data_parallel_size": 2}, "data_parallel_size"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative_config")])
def test_engine_arguments_that_would_break_groups_are_refused(vllm_args, key):
    from server.config import ModelSpec
    from server.engines.vllm_engine import GANG_SCHEDULER, _companion_engine_args
    from server.errors import ConfigError

    assert _companion_engine_args(ModelSpec(name="m", path="p", engine="vllm")) == {
        "scheduler_cls": GANG_SCHEDULER, "async_scheduling": False}
    with pytest.raises(ConfigError, match=f"models.m.vllm.{key}: vllm_companions"):
        _companion_engine_args(ModelSpec(name="m", path="p", engine="vllm", vllm=vllm_args))
