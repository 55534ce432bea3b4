"""The front end's request limits (`frontend.limits`, server/service.py): each at its boundary, the per-client
count of calls in flight, and the config's rules. Through the real server: tests/integration/test_server.py (the
defaults, and gRPC's message size) and test_production_server.py (calls in flight per token)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import LimitsSpec, parse_chorus_config
from server.engines.base import GenerationRequest
from server.errors import ConfigError, ResourceExhausted
from server.service import ClientSlots, check_limits, client_identity

LIMITS = LimitsSpec(max_tokens=300, max_prompt_chars=20, max_messages=2, max_stop_strings=2, max_stop_string_chars=3)


def request(prompt: str | None = "hi", messages: tuple[ChatMessage, ...] | None = None, **sampling):
    return GenerationRequest(request_id="r", sampling=SamplingParams(**sampling), prompt=prompt, messages=messages)


def test_a_request_at_every_limit_passes():
    check_limits(request("x" * 20, max_tokens=300, stop=("abc", "de")), LIMITS)
    check_limits(request(None, (ChatMessage("user", "x" * 10), ChatMessage("assistant", "y" * 10))), LIMITS)


@pytest.mark.parametrize("over, field, limit", [
    (request(max_tokens=301), "sampling.max_tokens", "max_tokens"),
    (request("x" * 21), "prompt", "max_prompt_chars"),
    (request(None, (ChatMessage("user", "x" * 11), ChatMessage("user", "y" * 10))), "messages", "max_prompt_chars"),
    (request(None, (ChatMessage("user", "x"),) * 3), "messages", "max_messages"),
    (request(stop=("a", "b", "c")), "sampling.stop", "max_stop_strings"),
    (request(stop=("a", "long")), "sampling.stop[1]", "max_stop_string_chars"),
])
def test_one_over_a_limit_is_invalid_argument_naming_field_and_limit(over, field, limit):
    with pytest.raises(InvalidArgument) as info:
        check_limits(over, LIMITS)
    assert info.value.field == field and f"(frontend.limits.{limit})" in str(info.value)


@dataclasses.dataclass
class Context:
    """The two things client_identity reads of a grpc.aio ServicerContext."""
    address: str
    metadata: tuple = ()

    def peer(self):
        return self.address

    def invocation_metadata(self):
        return self.metadata


@pytest.mark.parametrize("context, by_token, identity", [
    (Context("ipv4:127.0.0.1:50312"), False, "ipv4:127.0.0.1"),
    (Context("ipv6:[::1]:50312"), False, "ipv6:[::1]"),
    (Context("ipv4:10.0.0.7:1", (("authorization", "Bearer t1"),)), True, "token:t1"),
    (Context("ipv4:10.0.0.7:1", (("authorization", "Bearer t1"),)), False, "ipv4:10.0.0.7"),
    (Context("ipv4:10.0.0.7:1"), True, "ipv4:10.0.0.7"),  # no token (an open service): its address
])
def test_a_client_is_its_token_with_auth_else_its_address(context, by_token, identity):
    assert client_identity(context, by_token) == identity


def test_calls_in_flight_are_counted_per_client_and_given_back_however_they_end():
    slots = ClientSlots(limit=2, by_token=False)
    a, a_again, b = Context("ipv4:10.0.0.1:1"), Context("ipv4:10.0.0.1:2"), Context("ipv4:10.0.0.2:1")

    async def scenario():
        async with slots.held(a), slots.held(a_again):
            with pytest.raises(ResourceExhausted, match="max_rpcs_per_client"):
                async with slots.held(a):
                    pass
            async with slots.held(b):  # another client is not affected
                pass
        with pytest.raises(RuntimeError):
            async with slots.held(a):
                raise RuntimeError("the call failed")
        async with slots.held(a), slots.held(a):  # both places are free again
            pass

    asyncio.run(scenario())


@pytest.mark.parametrize("limits, says", [
    ({"max_tokens": 0}, "frontend.limits.max_tokens: a whole number >= 1"),
    ({"max_rpcs_per_client": 2.5}, "frontend.limits.max_rpcs_per_client: a whole number >= 1"),
    ({"max_prompt_tokens": 5}, r"unknown key\(s\) \['max_prompt_tokens'\]"),
])
def test_bad_limits_are_refused_naming_the_key(limits, says):
    with pytest.raises(ConfigError, match=says):
        parse_chorus_config({"models": {"m": {"path": "embedded:smollm2-135m-instruct"}}, "groups": {"g": {"base": "m"}},
                             "frontend": {"limits": limits}})


def test_limits_default_when_absent_and_merge_when_given():
    def frontend(**fields):
        return parse_chorus_config({"models": {"m": {"path": "/m"}}, "groups": {"g": {"base": "m"}},
                                    "frontend": fields}).frontend
    assert frontend().limits == LimitsSpec()
    assert frontend(limits={"max_tokens": 64}).limits == dataclasses.replace(LimitsSpec(), max_tokens=64)
