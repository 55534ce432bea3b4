"""Property-based tests (hypothesis) of the API against the running server: GenerateRequest and RerankRequest
messages built from their descriptors, every field maybe set (random oneof choices, unknown enum numbers, extreme
and non-finite numbers, unicode, empty and huge strings and lists), half of them valid requests with a few fields
overwritten so that they reach the engine. Whatever comes in: never INTERNAL or UNKNOWN,
every call ends by its deadline, and afterwards the server is SERVING with nothing left running.

Fields that set how much work a valid request does (max_tokens, best-of-N's judge tokens, passages) are drawn from
small or invalid values so that a run stays a minute long; everything else is drawn over its whole type."""

from __future__ import annotations

import collections
import time

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import wait_for_load

DEADLINE_S = 20.0
# How late past its deadline a call may end (the client's own clock, scheduling on a busy 2-core machine).
LATE_S = 5.0
# Valid-but-cheap and invalid values for the fields that size the work.
WORK = st.sampled_from([-1, 0, 1, 2, 3, 8193, 2**31 - 1])
UNSIGNED_WORK = st.sampled_from([0, 1, 2, 3, 9, 2**32 - 1])
SIZED = {
    "GenerateRequest.sampling": "always",
    "SamplingParams.max_tokens": WORK,
    "BestOfN.judge_max_tokens": UNSIGNED_WORK,
    "BestOfN.n": UNSIGNED_WORK,
    "RerankRequest.passages": st.lists(st.text(max_size=40), max_size=6),
    # Mostly the served model, so that most requests get past routing.
    "GenerateRequest.model": st.sampled_from(["", "", "smollm2-135m-instruct", "no-such-model", "m" * 10_000]),
    "RerankRequest.model": st.sampled_from(["", "", "smollm2-135m-instruct", "no-such-model"]),
}
HUGE = ["x" * 100_000, "🙂" * 20_000]
TEXT = st.one_of(st.text(max_size=60), st.sampled_from(["", " ", "\x00", "[A]", "<|im_end|>", *HUGE]))
NUMBERS = {
    FieldDescriptor.TYPE_FLOAT: st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, float("nan"),
                                                                                float("inf"), -float("inf")])),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(), st.sampled_from([0.0, 1e-300, float("nan"), float("inf")])),
    # Small numbers half the time (the valid range of most knobs), else anything the type holds.
    FieldDescriptor.TYPE_INT32: st.one_of(st.integers(-2, 12), st.integers(-2**31, 2**31 - 1)),
    FieldDescriptor.TYPE_UINT32: st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.integers(0, 12), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_INT64: st.one_of(st.integers(-2, 12), st.integers(-2**63, 2**63 - 1)),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
}


def _value(field: FieldDescriptor, depth: int, sparse: bool):
    if field.message_type is not None:
        return messages(field.message_type, depth + 1, sparse)
    if field.enum_type is not None:  # a declared value, or a number no client should send
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 99))
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    return NUMBERS[field.type]


def _field(field: FieldDescriptor, depth: int, sparse: bool):
    sized = SIZED.get(f"{field.containing_type.name}.{field.name}")
    if isinstance(sized, st.SearchStrategy):
        return sized
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_value(key, depth, sparse), _value(value, depth, sparse), max_size=4)
    if field.is_repeated:
        return st.lists(_value(field, depth, sparse), max_size=4 if field.message_type is not None else 20)
    return _value(field, depth, sparse)


@st.composite
def messages(draw, descriptor, depth: int = 0, sparse: bool = False):
    """A message of `descriptor`'s type: each field set or not (one field of a oneof at most); `sparse`: each set
    with a chance of one in eight only."""
    values = {}
    unset = [None] * (8 if sparse else 1)
    chosen_oneofs = {oneof.name: draw(st.sampled_from([*unset, *[f.name for f in oneof.fields]]))
                     for oneof in descriptor.oneofs if not oneof.name.startswith("_")}  # "_x": proto3 optional
    for field in descriptor.fields:
        oneof = field.containing_oneof if field.containing_oneof and field.containing_oneof.name in chosen_oneofs \
            else None
        if oneof is not None and chosen_oneofs[oneof.name] != field.name:
            continue
        always = oneof is not None or (SIZED.get(f"{descriptor.name}.{field.name}") == "always" and not sparse)
        if depth > 3 or not (always or draw(st.integers(0, 7 if sparse else 1)) == 0):
            continue
        values[field.name] = draw(_field(field, depth, sparse))
    message = getattr(pb, descriptor.name)()
    for name, value in values.items():
        target = getattr(message, name)
        if isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        elif descriptor.fields_by_name[name].message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _valid_generate() -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Say hi.")],
                              sampling=pb.SamplingParams(max_tokens=2))


VALID_STRATEGIES = [{}, {}, dict(contrastive=pb.ContrastiveDecoding()), dict(logit_fusion=pb.LogitFusion()),
                    dict(refusal_steering=pb.RefusalSteering()), dict(entropy_switch=pb.EntropySwitch()),
                    dict(best_of_n=pb.BestOfN(n=2, judge_max_tokens=2))]


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Half the time a valid request (each strategy at its defaults, or none) with a few fields overwritten at
    random, so that requests reach the engine; else a message random in every field."""
    if draw(st.booleans()):
        return draw(messages(pb.GenerateRequest.DESCRIPTOR))
    request = _valid_generate()
    for name, message in draw(st.sampled_from(VALID_STRATEGIES)).items():
        getattr(request, name).CopyFrom(message)
    request.MergeFrom(draw(messages(pb.GenerateRequest.DESCRIPTOR, sparse=True)))
    return request


@st.composite
def rerank_requests(draw) -> pb.RerankRequest:
    """Like generate_requests, a valid request two times in three (a rerank has fewer fields that can be wrong)."""
    if draw(st.integers(0, 2)) == 0:
        return draw(messages(pb.RerankRequest.DESCRIPTOR))
    request = pb.RerankRequest(query="What is the capital of France?",
                               passages=["Paris is the capital of France.", "Berlin is in Germany.", "Rome is old."])
    request.MergeFrom(draw(messages(pb.RerankRequest.DESCRIPTOR, sparse=True)))
    return request


def _call(method, request) -> grpc.StatusCode:
    started = time.monotonic()
    try:
        result = method(request, timeout=DEADLINE_S)
        if not isinstance(result, pb.GenerateResponse | pb.RerankResponse):
            list(result)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (error.details(), request)
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + LATE_S, f"{elapsed:.1f} s for {request}"
    event(code.name)
    return code


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _still_serving(stub, channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    wait_for_load(stub, (0, 0), timeout=60)


def test_fuzzed_generate_requests_never_fail_internally_or_hang(stub, channel):
    codes = collections.Counter()

    @FUZZ
    @given(request=generate_requests(), streaming=st.booleans())
    def one(request, streaming):
        codes[_call(stub.GenerateStream if streaming else stub.Generate, request)] += 1

    one()
    print(f"fuzzed Generate: {dict(codes)}")
    # The run reached the engine, not only the checks in front of it.
    assert codes[grpc.StatusCode.OK] >= 3 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 3, codes
    _still_serving(stub, channel)


def test_fuzzed_rerank_requests_never_fail_internally_or_hang(stub, channel):
    codes = collections.Counter()

    @settings(FUZZ, max_examples=25)
    @given(request=rerank_requests())
    def one(request):
        codes[_call(stub.Rerank, request)] += 1

    one()
    print(f"fuzzed Rerank: {dict(codes)}")
    assert codes[grpc.StatusCode.OK] >= 2 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 2, codes
    _still_serving(stub, channel)
