"""End-to-end checks of best-of-N over gRPC with the real model as candidate writer and judge, run against each
server config that imports them (test_server.py: transformers; test_vllm_server.py: vLLM)."""

from __future__ import annotations

import time

import grpc
import pytest

from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import status_of, wait_for_load

QUESTION = "A shop sells pens at 3 dollars each. How much do 4 pens cost? End with '#### <number>'."


def best_of_n(max_tokens: int = 20, question: str = QUESTION, **knobs) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)],
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0),
                              best_of_n=pb.BestOfN(**knobs))


def test_best_of_n_unary_and_streaming_give_the_winner_with_its_bracket(stub):
    request = best_of_n(n=3, seed=7, verdict=pb.BestOfN.VERDICT_SCORE, template=pb.BestOfN.TEMPLATE_GENERAL)
    unary = stub.Generate(request, timeout=300)
    report = unary.report.best_of_n
    assert len(report.candidates) == 3 and unary.text == report.candidates[report.winner].text
    assert list(unary.token_ids) == list(report.candidates[report.winner].token_ids) and unary.seed == 7
    assert report.judge_calls == sum(len(m.judgements) for m in report.bracket) <= 2
    assert all(j.parse == "probability" and 0 < j.first_score < 1 for m in report.bracket for j in m.judgements)
    assert unary.usage.forward_passes["smollm2-135m-instruct"] > 0
    assert unary.usage.completion_tokens == len(unary.token_ids)
    messages = list(stub.GenerateStream(request, timeout=300))
    progress = [m.progress.best_of_n.phase for m in messages if m.HasField("progress")]
    assert progress == ["candidates"] + ["round"] * report.rounds
    assert "".join(m.text for m in messages) == unary.text  # the seed makes the request reproducible
    assert [m.HasField("report") for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1].report.best_of_n == report


def test_best_of_n_with_generated_verdicts_and_composed_candidates(stub):
    """GENERATE verdicts (the judge writes, the tags are parsed) over candidates decoded with contrastive decoding."""
    response = stub.Generate(best_of_n(n=2, seed=3, template=pb.BestOfN.TEMPLATE_GENERAL, judge_max_tokens=24,
                                       contrastive=pb.ContrastiveDecoding()), timeout=300)
    report = response.report.best_of_n
    assert report.verdict == "generate" and report.judge_calls == 1 and 0 < report.judge_tokens <= 24
    assert report.bracket[0].judgements[0].parse in ("tags", "phrases", "boxed", "unparsed")
    assert response.text == report.candidates[report.winner].text


def test_best_of_n_with_every_knob_at_its_default(stub):
    response = stub.Generate(best_of_n(max_tokens=12, question="What is 2 + 2? Reply with just the number.",
                                       judge_max_tokens=16), timeout=300)
    report = response.report.best_of_n
    assert (len(report.candidates), report.selection, report.verdict, report.template) == (4, "knockout",
                                                                                          "generate", "math")
    assert report.judge_calls <= 3 and response.text == report.candidates[report.winner].text


@pytest.mark.parametrize("knobs, field", [
    (dict(n=0), "best_of_n.n"),
    (dict(n=1000), "best_of_n.n"),
    (dict(judge="nobody"), "best_of_n.judge"),
    (dict(selection=pb.BestOfN.SELECTION_POINTWISE, verdict=pb.BestOfN.VERDICT_GENERATE), "best_of_n.verdict"),
    (dict(judge_max_tokens=100000), "best_of_n.judge_max_tokens"),
    (dict(contrastive=pb.ContrastiveDecoding(alpha=2)), "best_of_n.contrastive.alpha"),
])
def test_bad_best_of_n_knobs_are_invalid_argument_naming_the_field(stub, knobs, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(best_of_n(**knobs), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field), info.value.details()


def test_a_deadline_in_the_middle_of_the_bracket_frees_every_slot(stub):
    """The deadline must fall after the candidates and inside the judging. The candidates are timed first under the
    machine's present load (the same request, cancelled when they are in), and the deadline is at least 6 s and at
    least 4 s past them: the judging (five 400-token judgements) takes longer than that on a quiet machine."""
    request = best_of_n(max_tokens=8, n=6, seed=1, template=pb.BestOfN.TEMPLATE_GENERAL, judge_max_tokens=400)
    started = time.monotonic()
    timing = stub.GenerateStream(request, timeout=300)
    assert next(m for m in timing if m.HasField("progress")).progress.best_of_n.phase == "candidates"
    timing.cancel()
    deadline = max(6.0, time.monotonic() - started + 4.0)
    wait_for_load(stub)
    started = time.monotonic()
    phases = []

    def stream():
        for message in stub.GenerateStream(request, timeout=deadline):
            if message.HasField("progress"):
                phases.append(message.progress.best_of_n.phase)

    assert status_of(stream) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert phases[:1] == ["candidates"], f"the candidates alone took the whole {deadline:.1f} s deadline"
    assert time.monotonic() - started < deadline + 9
    wait_for_load(stub)
