"""End-to-end checks of the Rerank RPC over gRPC on the real model, run against each server config that imports
them (test_server.py: transformers; test_vllm_server.py: vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import status_of, wait_for_load, wait_for_log_line

QUERY = "What is the capital of France?"
FACTS = ["Paris is the capital and largest city of France.", "Bananas are rich in potassium.",
         "The Eiffel Tower stands in Paris.", "Berlin is the capital of Germany.",
         "France is a country in Western Europe.", "Cats sleep for most of the day."]
PASSAGES = [f"{FACTS[i % len(FACTS)]} ({i})" for i in range(25)]


def test_rerank_ranks_every_passage_window_by_window(stub, server):
    response = stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES, request_id="rr-1"), timeout=300)
    model = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0].name
    assert sorted(response.ranking) == list(range(25)) and response.model == model
    assert list(response.scores) == [float(25 - place) for place in range(25)]
    assert [(w.start, w.end, w.forward_passes, w.passage_words) for w in response.windows] == [
        (5, 25, 1, 300), (0, 15, 1, 300)]
    assert all(w.latency_ms > 0 and w.prompt_tokens > 0 for w in response.windows)
    assert response.request_id == "rr-1" and dict(response.usage.forward_passes) == {model: 2}
    assert response.usage.prompt_tokens == sum(w.prompt_tokens for w in response.windows)
    top = stub.Rerank(pb.RerankRequest(query=QUERY, passages=PASSAGES, top_n=5), timeout=300)
    assert list(top.ranking) == list(response.ranking[:5]) and len(top.scores) == 5
    line = wait_for_log_line(server, "id=rr-1 ")
    for part in ("rpc=Rerank", f"model={model}", "passages=25", "forward_passes=2", "status=OK"):
        assert part in line, line


def test_rerank_generate_mode_and_permutations(stub):
    written = stub.Rerank(pb.RerankRequest(query=QUERY, passages=FACTS[:4], mode=pb.RerankRequest.MODE_GENERATE),
                          timeout=300)
    assert sorted(written.ranking) == [0, 1, 2, 3] and written.usage.completion_tokens > 0
    shuffled = stub.Rerank(pb.RerankRequest(query=QUERY, passages=FACTS, permutations=3, seed=2,
                                            aggregation=pb.RerankRequest.AGGREGATION_BORDA), timeout=300)
    assert sorted(shuffled.ranking) == list(range(6)) and shuffled.windows[0].forward_passes == 3


@pytest.mark.parametrize("request_, field", [
    (pb.RerankRequest(query=QUERY), "passages"),
    (pb.RerankRequest(query=" ", passages=FACTS), "query"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, window_size=1), "window_size"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, window_size=27), "window_size"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, window_size=4, stride=4), "stride"),
    (pb.RerankRequest(query=QUERY, passages=["p"] * 1001), "passages"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, permutations=9), "permutations"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, max_passage_words=0), "max_passage_words"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, mode=9), "mode"),
    (pb.RerankRequest(query=QUERY, passages=FACTS, aggregation=-2), "aggregation"),
])
def test_bad_rerank_input_is_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Rerank(request_, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"{field}:"), info.value.details()


def test_rerank_unknown_model_is_not_found_and_a_deadline_stops_the_windows(stub):
    assert status_of(lambda: stub.Rerank(pb.RerankRequest(model="nope", query=QUERY, passages=FACTS),
                                         timeout=30)) == grpc.StatusCode.NOT_FOUND
    long = [" ".join([fact] * 20) for fact in FACTS * 16]
    assert status_of(lambda: stub.Rerank(pb.RerankRequest(query=QUERY, passages=long), timeout=1.0)
                     ) == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_load(stub)


def test_a_cancelled_rerank_stops_its_windows(stub, server):
    long = [" ".join([fact] * 20) for fact in FACTS * 16]
    call = stub.Rerank.future(pb.RerankRequest(query=QUERY, passages=long, request_id="rr-cancel"), timeout=300)
    time.sleep(1.0)  # its first window is in the engine
    call.cancel()
    assert "status=CANCELLED" in wait_for_log_line(server, "id=rr-cancel ")
    wait_for_load(stub)


def test_cli_rerank(server, tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text("\n".join([json.dumps(FACTS[0]), json.dumps({"text": FACTS[1]}),
                               json.dumps({"content": FACTS[2]})]) + "\n")
    done = subprocess.run([sys.executable, "-m", "chorus.cli", "rerank", "--query", QUERY, "--passages", str(path),
                           "--address", server.address, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["ranking"]) == [0, 1, 2]
    shown = subprocess.run([sys.executable, "-m", "chorus.cli", "rerank", "--query", QUERY, "--passages", str(path),
                            "--address", server.address, "--top-n", "2"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 2 and "windows" in shown.stderr
    refused = subprocess.run([sys.executable, "-m", "chorus.cli", "rerank", "--query", QUERY, "--passages",
                              str(path), "--address", server.address, "--stride", "30"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "INVALID_ARGUMENT: stride" in refused.stderr
