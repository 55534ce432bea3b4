"""The slot-cache runner against a naive reference that recomputes the full forward every step."""

import random

import pytest
import torch

from server.lockstep.runner import ModelRunner, padding_groups

PROMPTS = ["The capital of France is", "Once upon a time, in a village by the sea,", "def fibonacci(n):"]
STEPS = 20


def naive_greedy(model, prompt_ids, steps):
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_batched_cached_greedy_equals_naive_recompute_with_joins_leaves_and_partial_steps(hf_model, tokenizer):
    runner = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=3, max_len=128)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # Sequence 0 and 1 start together; 2 joins after 5 steps; 0 leaves early (after 12 tokens).
    join_at = {0: 0, 1: 0, 2: 5}
    leave_after = {0: 12, 1: STEPS, 2: STEPS}
    live, generated, slots = [], {i: [] for i in range(3)}, {}
    for step in range(2 * STEPS):
        for i, at in join_at.items():
            if at == step:
                slots[i] = runner.open()
                generated[i].append(int(runner.extend(slots[i], prompts[i]).argmax()))
                live.append(i)
        for i in [i for i in live if len(generated[i]) >= leave_after[i]]:
            runner.close(slots[i])
            live.remove(i)
        if not live:
            break
        # A shuffled order exercises the slot-index bookkeeping after compaction; every third step decodes only
        # some of the live sequences (as vLLM's fusion processor does), the others wait a step.
        order = live[::-1] if step % 2 else live
        if step % 3 == 2 and len(order) > 1:
            order = order[1:]
        logits = runner.decode([slots[i] for i in order], [generated[i][-1] for i in order])
        for i, row in zip(order, logits):
            generated[i].append(int(row.argmax()))
    for i in range(3):
        want = naive_greedy(hf_model, prompts[i], leave_after[i])
        assert generated[i][:leave_after[i]] == want, f"prompt {i} diverged"


def test_close_compacts_and_moves_the_last_sequence(hf_model, tokenizer):
    runner = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=3, max_len=64)
    a, b, c = (runner.open() for _ in range(3))
    for slot, text in zip((a, b, c), ("one", "two three", "four five six")):
        runner.extend(slot, tokenizer.encode(text))
    keys_c = runner.cache.keys[0][c.index, :, :c.length].clone()
    runner.close(a)
    assert (c.index, b.index, a.index) == (0, 1, -1)
    assert runner.live == [c, b]
    assert torch.equal(runner.cache.keys[0][0, :, :c.length], keys_c)
    assert runner.free_slots == 1


def test_ragged_chunked_prefill_in_one_forward_equals_whole_prompts(hf_model, tokenizer):
    """Prompts fed in chunks of different lengths, several sequences per forward (extend_many), then decoded:
    the same greedy tokens as the naive recompute, and the same last-position logits as a plain forward."""
    runner = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=3, max_len=128)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    slots = [runner.open() for _ in prompts]
    fed = [0, 0, 0]
    chunk = [3, 5, 2]
    last = [None, None, None]
    while any(f < len(p) for f, p in zip(fed, prompts)):
        rows = [i for i in range(3) if fed[i] < len(prompts[i])]
        pieces = [prompts[i][fed[i]:fed[i] + chunk[i]] for i in rows]
        for i, logits in zip(rows, runner.extend_many([slots[i] for i in rows], pieces)):
            fed[i] += len(prompts[i][fed[i]:fed[i] + chunk[i]])
            last[i] = logits
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            want = hf_model(torch.tensor([prompt])).logits[0, -1].float()
            assert torch.allclose(last[i], want, atol=1e-4), f"prompt {i}"
    generated = [[int(row.argmax())] for row in last]
    for _ in range(STEPS - 1):
        for i, row in enumerate(runner.decode(slots, [g[-1] for g in generated])):
            generated[i].append(int(row.argmax()))
    for i, prompt in enumerate(prompts):
        assert generated[i] == naive_greedy(hf_model, prompt, STEPS), f"prompt {i} diverged"


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1:]]


def _padded_cost(lengths, groups, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def test_padding_groups_are_the_cheapest_split_against_every_partition():
    assert padding_groups([500] + [10] * 8, 32) == [[1, 2, 3, 4, 5, 6, 7, 8], [0]]
    assert padding_groups([3, 5, 2], 32) == [[2, 0, 1]]
    assert padding_groups([1, 2, 3, 100, 101], 0) == [[0], [1], [2], [3], [4]]
    rng = random.Random(3)
    for _ in range(150):
        lengths = [rng.choice([1, 2, 5, 9, 40, 200]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 1, 8, 32, 500])
        groups = padding_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        best = min(_padded_cost(lengths, p, overhead) for p in _partitions(list(range(len(lengths)))))
        assert _padded_cost(lengths, groups, overhead) == best
        for g in groups:  # equal lengths are never split
            assert not any(lengths[i] == lengths[j] for h in groups if h is not g for i in g for j in h)
    many = [rng.choice([1, 7, 30, 300]) for _ in range(1024)]  # as many rows as a batch of score jobs may have
    assert sorted(len(g) for g in padding_groups(many, 32)) == sorted(many.count(n) for n in set(many))


def test_rows_of_very_different_lengths_go_in_separate_forwards_with_the_same_logits(hf_model, tokenizer):
    """A long prompt beside short ones: extend_many and tail_log_probs split them (two forwards each), and every
    row's logits equal a plain forward of its whole sequence."""
    long_prompt = tokenizer.encode(" ".join(PROMPTS * 6))
    short = [tokenizer.encode(p) for p in PROMPTS[:2]]
    prompts = [short[0], long_prompt, short[1]]
    runner = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=3, max_len=256)
    assert runner.forward_overhead_tokens == 32  # the CPU default
    assert len(padding_groups([len(p) for p in prompts], runner.forward_overhead_tokens)) == 2
    slots = [runner.open() for _ in prompts]
    before = runner.forward_passes
    logits = runner.extend_many(slots, prompts)
    assert runner.forward_passes == before + 2
    scored = runner.tail_log_probs(prompts, keep=2)
    assert runner.forward_passes == before + 4
    padded = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=3, max_len=256,
                         forward_overhead_tokens=10 ** 9)  # never splits: one forward, the same logits
    assert torch.allclose(padded.extend_many([padded.open() for _ in prompts], prompts), logits, atol=1e-4)
    assert padded.forward_passes == 1
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            want = hf_model(torch.tensor([prompt])).logits[0, -2:].float()
            assert torch.allclose(logits[i], want[-1], atol=1e-4), f"prompt {i}"
            assert torch.allclose(scored[i], want.log_softmax(-1), atol=1e-4), f"prompt {i}"
    generated = [[int(row.argmax())] for row in logits]
    for _ in range(STEPS - 1):
        for i, row in enumerate(runner.decode(slots, [g[-1] for g in generated])):
            generated[i].append(int(row.argmax()))
    for i, prompt in enumerate(prompts):
        assert generated[i] == naive_greedy(hf_model, prompt, STEPS), f"prompt {i} diverged"
    # A row shorter than the positions kept for the batch (a long loglik beside a short score) in a forward alone.
    tiny = short[0][:3]
    scored = runner.tail_log_probs([long_prompt, tiny], keep=8)
    with torch.inference_mode():
        want = hf_model(torch.tensor([tiny])).logits[0].float().log_softmax(-1)
        assert torch.allclose(scored[1, -3:], want, atol=1e-4)
        want = hf_model(torch.tensor([long_prompt])).logits[0, -8:].float().log_softmax(-1)
        assert torch.allclose(scored[0], want, atol=1e-4)


def test_exit_states_give_the_early_exit_views_logits_on_every_kind_of_forward(hf_model, tokenizer):
    """A runner keeping layer 8's hidden states: its head on them equals an early-exit view's own runner on the
    same tokens, after a whole-prompt extend, ragged chunked prefills, a decode of all slots in a shuffled order
    (the batch is in cache order) and a decode of some; a fork copies them; a runner without exit layers keeps
    none."""
    from server.lockstep.guides import early_exit_view

    full = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=4, max_len=128, exit_layers=[8])
    view = ModelRunner(early_exit_view(hf_model, 8), vocab_size=len(tokenizer), max_slots=3, max_len=128)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ours, theirs = [full.open() for _ in prompts], [view.open() for _ in prompts]

    def check(slots, want):
        got = full.head(torch.stack([s.exit_states[8] for s in slots]))
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    full.extend(ours[0], prompts[0])
    check(ours[:1], view.extend(theirs[0], prompts[0])[None])
    rows = [1, 2]
    pieces = [prompts[1][:4], prompts[2]]
    full.extend_many([ours[i] for i in rows], pieces)
    check([ours[i] for i in rows], view.extend_many([theirs[i] for i in rows], pieces))
    full.extend_many([ours[1]], [prompts[1][4:]])
    check([ours[1]], view.extend_many([theirs[1]], [prompts[1][4:]]))
    for order in ([2, 0, 1], [1, 2]):
        tokens = [prompts[i][0] for i in order]
        full.decode([ours[i] for i in order], tokens)
        check([ours[i] for i in order], view.decode([theirs[i] for i in order], tokens))
    fork = full.fork(ours[2])
    assert torch.equal(fork.exit_states[8], ours[2].exit_states[8])
    plain = ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=1, max_len=128)
    slot = plain.open()
    plain.extend(slot, prompts[0])
    assert slot.exit_states == {}
    with pytest.raises(ValueError, match="layers are 1..30"):
        ModelRunner(hf_model, vocab_size=len(tokenizer), max_slots=1, max_len=128, exit_layers=[30])
