import pytest

from decoding.text import IncrementalDetokenizer, StopStringMatcher


def test_multibyte_characters_are_never_emitted_broken(tokenizer):
    text = "Héllo 🙂 世界 ok"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt_ids=[])
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # "世" is split over byte-fallback tokens here: some token must have produced no text yet.
    assert "" in deltas


def test_detokenizer_after_a_chat_prompt_matches_full_decode(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    completion = tokenizer.encode(" The capital of France is Paris. Ça va? 東京")
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt_ids=prompt)
    assert "".join(detok.push(i) for i in completion) == tokenizer.decode(completion)


@pytest.mark.parametrize("stop, deltas, emitted, stopped", [
    (["\n\n"], ["a\n", "\nb"], ["a", ""], True),
    (["\n\n"], ["a\n", "b"], ["a", "\nb"], False),
    (["END"], ["xE", "N", "D tail"], ["x", "", ""], True),
    (["END"], ["xE", "N", "o"], ["x", "", "ENo"], False),
    (["ab", "b"], ["xab"], ["x"], True),        # the earliest occurrence wins
    (["stop"], ["no stop here"], ["no "], True),
    ([], ["anything"], ["anything"], False),
])
def test_stop_strings(stop, deltas, emitted, stopped):
    matcher = StopStringMatcher(stop)
    out, hit = [], False
    for delta in deltas:
        text, hit = matcher.push(delta)
        out.append(text)
        if hit:
            break
    assert out == emitted
    assert hit == stopped


def test_held_text_is_released_by_flush():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("value </e") == ("value ", False)
    assert matcher.flush() == "</e"
