"""chorus.client without a Chorus server: building requests from keyword arguments and CLI parameters, the errors
it raises (from a real gRPC server in this process), its retry of UNAVAILABLE and only of it. The client against
the real server: tests/integration/client_checks.py."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time

import grpc
import pytest

from chorus import cli
from chorus.client import (
    STRATEGIES, Client, GenerateFields, RequestError, RerankFields, SyncClient, generate_request, parse_param,
    rerank_request, strategy_message)
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from decoding.errors import InvalidArgument
from server.service import _field_details


def test_a_strategy_is_a_dict_of_its_fields_with_short_enum_names_and_nested_messages():
    message = strategy_message("contrastive", dict(mode="uscd", alpha=0.25, contrast_context={"prompt": "x"}))
    assert message == pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD, alpha=0.25,
                                             contrast_context=pb.Context(prompt="x"))
    message = strategy_message("best_of_n", dict(n=3, verdict="VERDICT_SCORE", sampling={"temperature": 0.5},
                                                 seed=9, contrastive={"mode": "Steer"}))
    assert message.n == 3 and message.verdict == pb.BestOfN.VERDICT_SCORE and message.sampling.temperature == 0.5
    assert message.seed == 9 and message.WhichOneof("candidates") == "contrastive"
    assert message.contrastive.mode == pb.ContrastiveDecoding.MODE_STEER
    prefix = pb.RefusalPrefix(category="apology", text="I am sorry")
    message = strategy_message("refusal_steering", dict(refusal_prefixes=[prefix, {"category": "b", "text": "No"}],
                                                        thresholds={"apology": 0.2}))
    assert list(message.refusal_prefixes) == [prefix, pb.RefusalPrefix(category="b", text="No")]
    assert dict(message.thresholds) == pytest.approx({"apology": 0.2})
    assert strategy_message("logit_fusion", {}) == pb.LogitFusion()


def test_a_strategy_given_as_its_message_is_taken_whole():
    given = pb.LogitFusion(mode=pb.LogitFusion.MODE_STATIC, alphas=[0.5])
    assert strategy_message("logit_fusion", given) is given
    with pytest.raises(ValueError, match="logit_fusion: expected a LogitFusion, got a ContrastiveDecoding"):
        strategy_message("logit_fusion", pb.ContrastiveDecoding())


@pytest.mark.parametrize("strategy, params, message", [
    ("nope", {}, "unknown strategy 'nope'; one of contrastive, logit_fusion, entropy_switch, refusal_steering, "
                 "best_of_n"),
    ("contrastive", {"alhpa": 1}, "contrastive.alhpa: unknown field; ContrastiveDecoding has mode, alpha, beta"),
    ("contrastive", {"mode": "cdd"}, "contrastive.mode: unknown value 'cdd'; one of unspecified, cd, uscd, steer"),
    ("best_of_n", {"sampling": {"temprature": 1}}, "best_of_n.sampling.temprature: unknown field; SamplingParams "
                                                   "has max_tokens"),
    ("best_of_n", {"sampling": 3}, "best_of_n.sampling: expected a SamplingParams"),
    ("contrastive", {"alpha": "high"}, "contrastive: .*alpha"),
    ("contrastive", 0.1, "contrastive: expected a ContrastiveDecoding or a dict"),
])
def test_unknown_strategies_fields_and_values_are_refused_naming_them(strategy, params, message):
    with pytest.raises(ValueError, match=message):
        strategy_message(strategy, params)


def test_cli_params_are_typed_by_the_strategy_message():
    params = {}
    for assignment in ("mode=threshold", "threshold=0.3", "thresholds=apology:0.2,decline:0.5", "categories=apology",
                       "categories=decline,other", 'refusal_prefixes=[{"category": "a", "text": "Sorry"}]',
                       "softmax_temperature=2"):
        parse_param(pb.RefusalSteering.DESCRIPTOR, assignment, params)
    assert params == {"mode": "threshold", "threshold": 0.3, "thresholds": {"apology": 0.2, "decline": 0.5},
                      "categories": ["apology", "decline", "other"],
                      "refusal_prefixes": [{"category": "a", "text": "Sorry"}], "softmax_temperature": 2.0}
    params = {}
    for assignment in ("n=2", "both_orders=yes", "sampling.temperature=0.7", "sampling.stop=[\"a,b\"]",
                       "contrastive.alpha=0.2", "seed=7"):
        parse_param(pb.BestOfN.DESCRIPTOR, assignment, params)
    assert params == {"n": 2, "both_orders": True, "sampling": {"temperature": 0.7, "stop": ["a,b"]},
                      "contrastive": {"alpha": 0.2}, "seed": 7}
    assert strategy_message("best_of_n", params).sampling.stop == ["a,b"]
    params = {}
    parse_param(pb.LogitFusion.DESCRIPTOR, "experts=a,b", params)
    parse_param(pb.LogitFusion.DESCRIPTOR, "alphas=[0.5, 0.25]", params)
    assert params == {"experts": ["a", "b"], "alphas": [0.5, 0.25]}


@pytest.mark.parametrize("message_type, assignment, message", [
    (pb.ContrastiveDecoding, "alpha", "'alpha': expected key=value"),
    (pb.ContrastiveDecoding, "alhpa=1", "alhpa: unknown field; ContrastiveDecoding has mode, alpha"),
    (pb.ContrastiveDecoding, "alpha=high", "alpha: could not convert"),
    (pb.ContrastiveDecoding, "alpha.x=1", "alpha.x: alpha is not a message"),
    (pb.ContrastiveDecoding, "contrast_context={", "contrast_context: Expecting"),
    (pb.RefusalSteering, "thresholds=apology", "thresholds: expected key:value,... or a JSON object, got 'apology'"),
    (pb.RefusalSteering, "trace=yes", "trace: unknown field"),
    (pb.EntropySwitch, "trace=maybe", "trace: expected true or false, got 'maybe'"),
    (pb.EntropySwitch, "window=2.5", "window: invalid literal"),
])
def test_bad_cli_params_are_refused_naming_the_key(message_type, assignment, message):
    with pytest.raises(ValueError, match=message):
        parse_param(message_type.DESCRIPTOR, assignment, {})


def test_the_cli_builds_the_strategy_from_params_or_json_and_refuses_mixing_them():
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "x", "--strategy", "entropy_switch", "--param", "threshold=1.5",
                              "--param", "start=large", "--param", "trace=true"])
    assert cli.strategy_params(args) == {"threshold": 1.5, "start": "large", "trace": True}
    args = parser.parse_args(["generate", "x", "--strategy", "contrastive", "--strategy-json", '{"beta": 0.3}'])
    assert cli.strategy_params(args) == {"beta": 0.3}
    for argv, message in ((["--param", "beta=1"], "need --strategy"),
                          (["--strategy", "contrastive", "--param", "beta=1", "--strategy-json", "{}"], "not both"),
                          (["--strategy", "contrastive", "--strategy-json", "[1]"], "a JSON object"),
                          (["--strategy", "contrastive", "--strategy-json", "{beta"], "--strategy-json: Expecting")):
        with pytest.raises(ValueError, match=message):
            cli.strategy_params(parser.parse_args(["generate", "x", *argv]))


def test_the_cli_refuses_an_unknown_param_with_exit_status_2_listing_the_fields(capsys):
    assert cli.main(["generate", "x", "--strategy", "logit_fusion", "--param", "expert=a"]) == 2
    assert "expert: unknown field; LogitFusion has mode, experts, alphas" in capsys.readouterr().err


def test_requests_leave_unset_sampling_fields_to_the_server():
    request = generate_request(messages=[("system", "Be brief."), {"role": "user", "content": "Hi"},
                                         pb.ChatMessage(role="assistant", content="Hello")],
                               temperature=0, stop=["\n"], seed=3, best_of_n={"seed": 5}, request_id="r-1")
    assert [m.role for m in request.messages] == ["system", "user", "assistant"]
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert not request.sampling.HasField("max_tokens") and not request.sampling.HasField("top_p")
    assert (request.sampling.seed, request.best_of_n.seed, request.request_id) == (3, 5, "r-1")
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        generate_request("a", messages=[("user", "b")])
    with pytest.raises(TypeError, match="unexpected argument 'alpha': neither a request field nor a strategy"):
        generate_request("a", alpha=0.1)
    with pytest.raises(ValueError, match="one strategy a request; got contrastive, logit_fusion"):
        generate_request("a", contrastive={}, logit_fusion={})
    assert generate_request("a").WhichOneof("strategy") is None
    ranked = rerank_request("q", ["a", "b"], mode="generate", aggregation="borda", permutations=3)
    assert (ranked.mode, ranked.aggregation) == (pb.RerankRequest.MODE_GENERATE, pb.RerankRequest.AGGREGATION_BORDA)
    assert ranked.permutations == 3 and not ranked.HasField("window_size")
    with pytest.raises(ValueError, match="mode: unknown value 'first'; one of unspecified, first_token, generate"):
        rerank_request("q", ["a"], mode="first")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Refusing(pb_grpc.DecodingServicer):
    """Answers every Generate INVALID_ARGUMENT the way the server does (the field in the rich error details), and
    counts the calls."""

    def __init__(self):
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        error = InvalidArgument("sampling.top_p", "must be in (0, 1], got 2.0")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error),
                            (("x-request-id", "abc"),) + _field_details(error, str(error)))


async def serve_late(port: int, delay: float, servicer) -> grpc.aio.Server:
    await asyncio.sleep(delay)
    server = grpc.aio.server()
    pb_grpc.add_DecodingServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_errors_carry_the_code_the_message_the_field_and_the_request_id_and_are_not_retried():
    async def run():
        servicer, port = Refusing(), free_port()
        server = await serve_late(port, 0, servicer)
        try:
            async with Client(f"127.0.0.1:{port}") as client:
                with pytest.raises(RequestError) as raised:
                    await client.generate("x", top_p=2.0)
        finally:
            await server.stop(None)
        return raised.value, servicer.calls

    error, calls = asyncio.run(run())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "sampling.top_p" and error.request_id == "abc"
    assert error.message == "sampling.top_p: must be in (0, 1], got 2.0"
    assert str(error) == "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1], got 2.0"
    assert calls == 1, "only UNAVAILABLE is retried"


def test_a_call_to_a_server_that_starts_late_is_retried_until_it_answers():
    async def run(retries: int):
        servicer, port = Refusing(), free_port()
        late = asyncio.create_task(serve_late(port, 0.5, servicer))
        started = time.monotonic()
        try:
            # Retries come after random waits of up to 2, 4, 8, 16 s: all four inside the first second (before the
            # channel's first reconnection) has a chance below 1e-4.
            async with Client(f"127.0.0.1:{port}", retries=retries, initial_backoff=2.0, max_backoff=16.0,
                              timeout=60) as client:
                await client.generate("x")
        except RequestError as error:
            outcome = error.code
        server = await late
        await server.stop(None)
        return outcome, time.monotonic() - started, servicer.calls

    code, _, calls = asyncio.run(run(retries=0))
    assert (code, calls) == (grpc.StatusCode.UNAVAILABLE, 0), "without retries the first refusal is final"
    code, waited, calls = asyncio.run(run(retries=4))
    assert (code, calls) == (grpc.StatusCode.INVALID_ARGUMENT, 1), "the server answered once it was up"
    assert waited >= 0.5


def test_the_sync_client_gives_the_same_errors_and_closes_its_loop():
    async def start(port):
        return await serve_late(port, 0, Refusing())

    port = free_port()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start(port))
    try:
        with SyncClient(f"127.0.0.1:{port}") as client:
            future = loop.run_in_executor(None, lambda: client.generate("x"))
            with pytest.raises(RequestError) as raised:
                loop.run_until_complete(future)
        assert raised.value.field == "sampling.top_p"
        assert client._loop.is_closed() and not client._thread.is_alive()
    finally:
        loop.run_until_complete(server.stop(None))
        loop.close()


def test_the_typed_keywords_are_generate_request_s_and_rerank_request_s_with_every_strategy():
    generate = set(inspect.signature(generate_request).parameters) - {"prompt", "strategy"}
    assert set(GenerateFields.__annotations__) == generate | set(STRATEGIES)
    assert set(RerankFields.__annotations__) == set(inspect.signature(rerank_request).parameters) - {"query",
                                                                                                     "passages"}


def test_client_options_are_checked():
    with pytest.raises(ValueError, match="retries: 0 to 4"):
        Client(retries=5)
    with pytest.raises(ValueError, match="go together"):
        Client(client_certificate=b"pem")

