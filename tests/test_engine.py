"""The transformers engine in-process on the real SmolLM2 weights: batching, cancellation, deadlines, limits."""

import asyncio
import gc
import time

import pytest

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import GroupSpec, ModelSpec
from server.engines.base import GenerationRequest
from server.engines.transformers_engine import TransformersEngine
from server.errors import DeadlineExceeded, ResourceExhausted
from server.lockstep.runner import ModelRunner
from tests.conftest import EMBEDDED

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
             "Who wrote Hamlet?", "What is the largest planet?", "Translate 'cat' to French.",
             "What color is the sky?", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def engine(model_path):
    engine = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=512),
                                GroupSpec("g", "smollm2", max_batch_size=8))
    yield engine
    engine.shutdown()


def chat(question, **sampling):
    return GenerationRequest(request_id=question, messages=(ChatMessage("user", question),),
                             sampling=SamplingParams(**sampling).validate())


async def collect(engine, request):
    chunks = [c async for c in engine.generate(request)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]


def test_greedy_chat_answers_paris(engine):
    text, ids, last = asyncio.run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32)))
    assert "Paris" in text
    assert last.finish_reason == "stop" and last.usage.completion_tokens == len(ids)
    assert last.usage.forward_passes == {"smollm2": len(ids)}


async def timed(engine, request):
    """The request's last chunk between the times it was sent and it ended."""
    sent = time.time()
    _, _, last = await collect(engine, request)
    return sent, last, time.time()


def test_the_last_chunk_says_when_the_sequence_was_admitted_and_got_its_first_token(engine):
    sent, last, ended = asyncio.run(timed(engine, chat(QUESTIONS[0], temperature=0, max_tokens=6)))
    assert sent <= last.phases.admitted <= last.phases.first_token <= ended


def test_concurrent_greedy_requests_equal_their_solo_runs(engine):
    requests = [chat(q, temperature=0, max_tokens=24) for q in QUESTIONS]
    solo = [asyncio.run(collect(engine, r))[1] for r in requests]

    async def together():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    batched = [ids for _, ids, _ in asyncio.run(together())]
    assert batched == solo


def test_seeded_sampling_is_reproducible_across_batches(engine):
    request = chat("Write a sentence about the sea.", temperature=1.0, top_p=0.95, seed=1234, max_tokens=20)
    alone = asyncio.run(collect(engine, request))[1]

    async def with_company():
        others = [chat(q, temperature=0.8, max_tokens=20) for q in QUESTIONS[:5]]
        results = await asyncio.gather(collect(engine, request), *(collect(engine, o) for o in others))
        return results[0][1]

    assert asyncio.run(with_company()) == alone


def test_stop_string_ends_generation_and_is_not_returned(engine):
    free_text = asyncio.run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32)))[0]
    stop = "France"
    assert stop in free_text
    text, _, last = asyncio.run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32, stop=[stop])))
    assert last.finish_reason == "stop"
    assert text == free_text[:free_text.index(stop)]


def test_max_tokens_ends_with_length(engine):
    text, ids, last = asyncio.run(collect(engine, chat(QUESTIONS[1], temperature=0, max_tokens=3,
                                                       ignore_eos=True)))
    assert len(ids) == 3 and last.finish_reason == "length"


def test_prompt_plus_max_tokens_over_context_is_invalid(engine):
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(collect(engine, chat(QUESTIONS[0], max_tokens=10_000)))
    assert info.value.field == "sampling.max_tokens"


def forward_passes() -> int:
    """Forward passes run so far by every model runner in this process (their own counters): the engine's, on all
    its models; the engines of other tests are shut down and run none."""
    return sum(o.forward_passes for o in gc.get_objects() if isinstance(o, ModelRunner))


def assert_stops_stepping(engine, since: int, in_flight: int) -> None:
    """After a request left (`since` = the engine's forward passes then), the engine runs at most the `in_flight`
    forwards it may have started before it noticed, goes idle and runs none: a request it kept stepping would
    take a forward per token until its max_tokens."""
    wait_until_idle(engine)
    idle = forward_passes()
    time.sleep(0.3)
    assert forward_passes() == idle, "the engine steps with nothing running"
    assert idle - since <= in_flight, f"{idle - since} forward passes after the request left"


def test_closing_the_stream_stops_stepping_the_request(engine):
    async def read_two_then_leave():
        stream = engine.generate(chat(QUESTIONS[2], max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        return forward_passes()

    assert_stops_stepping(engine, asyncio.run(read_two_then_leave()), in_flight=2)


def test_a_passed_deadline_raises_and_stops_stepping_the_request(engine):
    request = GenerationRequest(request_id="late", messages=(ChatMessage("user", "Count to one thousand."),),
                                sampling=SamplingParams(max_tokens=400, ignore_eos=True),
                                deadline=time.time() + 0.5)

    async def until_the_deadline():
        with pytest.raises(DeadlineExceeded):
            await collect(engine, request)
        return forward_passes()

    # The engine drops the sequence before it raises: not one more forward for it.
    assert_stops_stepping(engine, asyncio.run(until_the_deadline()), in_flight=0)
    assert "Paris" in asyncio.run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=16)))[0]


def test_queue_full_is_resource_exhausted(model_path):
    small = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=512),
                               GroupSpec("g", "smollm2", max_batch_size=1, max_waiting=1))
    try:
        async def scenario():
            running = small.generate(chat(QUESTIONS[0], max_tokens=300, ignore_eos=True))
            await running.__anext__()  # admitted: holds the only slot
            waiting = asyncio.ensure_future(collect(small, chat(QUESTIONS[1], max_tokens=2)))
            await asyncio.sleep(0.1)  # queued: fills max_waiting
            with pytest.raises(ResourceExhausted):
                await collect(small, chat(QUESTIONS[2], max_tokens=2))
            await running.aclose()
            return await waiting

        assert asyncio.run(scenario())[2].finish_reason == "length"
    finally:
        small.shutdown()


def wait_until_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        load = engine.load()
        if load.running == 0 and load.waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.load()}")
