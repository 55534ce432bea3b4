"""chorus.client against the real server (collected by test_server.py, over its server): every RPC, streaming, a
deadline, a bad argument naming its field, a server whose port opens late, the blocking wrapper; and README's grpcurl
requests."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from chorus.client import Client, RequestError, SyncClient
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from tests.integration.conftest import wait_for_log_line
from tests.integration.rerank_checks import FACTS, QUERY

QUESTION = [("user", "What is the capital of France?")]
CONTRASTIVE = {"mode": "cd", "alpha": 0.2}


def test_the_client_calls_every_rpc_and_a_stream_equals_the_whole_answer(server):
    async def run():
        async with Client(server.address, timeout=120) as client:
            health = await client.health(), await client.health("chorus.v1.Decoding")
            models = await client.list_models()
            whole = await client.generate(messages=QUESTION, temperature=0, max_tokens=12, ignore_eos=True, contrastive=CONTRASTIVE)
            parts = [m async for m in client.generate_stream(messages=QUESTION, temperature=0, max_tokens=12,
                                                             ignore_eos=True, contrastive=CONTRASTIVE)]
            ranked = await client.rerank(QUERY, FACTS, window_size=3, stride=1, top_n=2)
            return health, models, whole, parts, ranked

    health, models, whole, parts, ranked = asyncio.run(run())
    assert health == ("SERVING", "SERVING")
    assert models.models[0].name == "smollm2-135m-instruct" and models.models[0].is_default
    assert whole.text and whole.usage.completion_tokens == 12 == len(whole.token_ids)
    assert whole.report.contrastive.mode == "cd" and whole.report.contrastive.steps == 12
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert parts[-1].report == whole.report and not any(p.HasField("report") for p in parts[:-1])
    assert parts[-1].usage == whole.usage and whole.request_id and parts[0].request_id
    assert len(ranked.ranking) == 2 and set(ranked.ranking) <= set(range(len(FACTS))) and ranked.windows


def test_client_errors_name_the_code_the_field_and_the_request_and_only_unavailable_is_retried(server):
    async def run():
        async with Client(server.address) as client:
            with_field = strategy_field = expired = None
            try:
                await client.generate("x", top_p=2.0, request_id="client-bad-top-p")
            except RequestError as error:
                with_field = error
            try:
                await client.generate("x", logit_fusion={"experts": ["no-such-expert"]},
                                      request_id="client-bad-expert")
            except RequestError as error:
                strategy_field = error
            try:
                await client.generate("Count to a thousand:", max_tokens=1000, ignore_eos=True, timeout=1.5,
                                      request_id="client-deadline")
            except RequestError as error:
                expired = error
            return with_field, strategy_field, expired

    with_field, strategy_field, expired = asyncio.run(run())
    assert with_field.code == grpc.StatusCode.INVALID_ARGUMENT and with_field.field == "sampling.top_p"
    assert with_field.request_id == "client-bad-top-p" and "sampling.top_p" in with_field.message
    assert strategy_field.code == grpc.StatusCode.INVALID_ARGUMENT
    assert strategy_field.field == "logit_fusion.experts[0]" and "no-such-expert" in strategy_field.message
    assert expired.code == grpc.StatusCode.DEADLINE_EXCEEDED, expired
    for request_id, status in (("client-bad-top-p", "INVALID_ARGUMENT"), ("client-deadline", "DEADLINE_EXCEEDED")):
        wait_for_log_line(server, f"id={request_id} ")
        lines = [line for line in server.log().splitlines() if f"id={request_id} " in line]
        assert len(lines) == 1 and f"status={status}" in lines[0], lines


async def relay(port: int, target: str) -> asyncio.Server:
    """A TCP relay from 127.0.0.1:port to the server: a port that opens when this starts."""
    host, target_port = target.rsplit(":", 1)

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def connect(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_server(connect, "127.0.0.1", port)


def test_a_call_is_retried_until_the_server_s_port_opens(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run():
        async def open_late():
            await asyncio.sleep(0.5)
            return await relay(port, server.address)

        opening = asyncio.create_task(open_late())
        started = time.monotonic()
        # retries after random waits of up to 2, 4, 8, 16 s: not all four before the port opens
        async with Client(f"127.0.0.1:{port}", initial_backoff=2.0, max_backoff=16.0, timeout=60) as client:
            answer = await client.generate(messages=QUESTION, temperature=0, max_tokens=6, ignore_eos=True)
        waited = time.monotonic() - started
        opened = await opening
        opened.close()
        return answer, waited

    answer, waited = asyncio.run(run())
    assert answer.usage.completion_tokens == 6 and answer.text
    assert waited >= 0.5, "the first attempts found nothing listening"


def test_the_blocking_client_streams_and_leaving_a_stream_cancels_it(server):
    with SyncClient(server.address, timeout=120) as client:
        assert client.health() == "SERVING"
        whole = client.generate(messages=QUESTION, temperature=0, max_tokens=6, ignore_eos=True)
        assert "".join(m.text for m in client.generate_stream(messages=QUESTION, temperature=0, max_tokens=6,
                                                              ignore_eos=True)) == whole.text
        stream = client.generate_stream("Count to a thousand:", max_tokens=2000, ignore_eos=True,
                                        request_id="client-left-stream")
        for _ in zip(range(2), stream):
            pass
        stream.close()
        assert client.list_models().models
    assert "status=CANCELLED" in wait_for_log_line(server, "id=client-left-stream ")


def test_the_readme_s_grpcurl_requests_are_served(server):
    """Every Decoding call README.md shows with grpcurl, its JSON body sent as grpcurl would, answers OK here."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    calls = re.findall(r"grpcurl -plaintext -d '(.*?)' \S+ chorus\.v1\.Decoding/(\w+)", readme)
    methods = pb.DESCRIPTOR.services_by_name["Decoding"].methods_by_name
    assert {method for _, method in calls} == set(methods)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DecodingStub(channel)
        for body, method in calls:
            request = json_format.Parse(body, getattr(pb, methods[method].input_type.name)())
            answer = getattr(stub, method)(request, timeout=300)
            messages = list(answer) if methods[method].server_streaming else [answer]
            assert messages and all(m.ByteSize() > 0 for m in messages), (method, body)
