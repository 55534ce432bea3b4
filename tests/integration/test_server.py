"""The real server over gRPC from this (separate) process: answers, streaming, seeds, batching, health,
reflection, errors, deadlines."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import ROOT, status_of, wait_for_load, wait_for_log_line
from bench.otlp_collector import GrpcReceiver
from tests.integration.best_of_n_checks import (  # noqa: F401  (best-of-N over this module's server)
    test_a_deadline_in_the_middle_of_the_bracket_frees_every_slot,
    test_bad_best_of_n_knobs_are_invalid_argument_naming_the_field,
    test_best_of_n_unary_and_streaming_give_the_winner_with_its_bracket, test_best_of_n_with_every_knob_at_its_default,
    test_best_of_n_with_generated_verdicts_and_composed_candidates)
from tests.integration.client_checks import (  # noqa: F401  (chorus.client against this module's server)
    test_a_call_is_retried_until_the_server_s_port_opens, test_the_readme_s_grpcurl_requests_are_served,
    test_client_errors_name_the_code_the_field_and_the_request_and_only_unavailable_is_retried,
    test_the_blocking_client_streams_and_leaving_a_stream_cancels_it,
    test_the_client_calls_every_rpc_and_a_stream_equals_the_whole_answer)
from tests.integration.fuzz_checks import (  # noqa: F401  (property-based requests against this module's server)
    test_fuzzed_generate_requests_never_fail_internally_or_hang, test_fuzzed_rerank_requests_never_fail_internally_or_hang)
from tests.integration.rerank_checks import (  # noqa: F401  (reranking over this module's server)
    test_a_cancelled_rerank_stops_its_windows, test_bad_rerank_input_is_invalid_argument_naming_the_field,
    test_cli_rerank, test_rerank_generate_mode_and_permutations, test_rerank_ranks_every_passage_window_by_window,
    test_rerank_unknown_model_is_not_found_and_a_deadline_stops_the_windows)
from tests.integration.strategy_checks import (  # noqa: F401  (collected and run against this module's server)
    strategy_answers, test_a_strategy_streams_the_unary_completion_with_the_report_on_the_last_message_only,
    test_bad_strategy_knobs_are_refused_with_a_usable_message,
    test_cancelled_and_expired_strategy_requests_give_back_their_guide_slots,
    test_every_strategy_and_mode_answers_with_its_report,
    test_every_strategy_knob_at_a_non_default_value_is_accepted_and_takes_effect,
    test_list_models_describes_every_model_of_the_config, test_list_models_reports_strategies_and_guides,
    test_neutral_knobs_reduce_to_plain_greedy)

pytestmark = pytest.mark.integration

# The collector this module's server sends its spans to (tracing on for every request here).
RECEIVER: GrpcReceiver | None = None


def CONFIG(folder) -> str:  # noqa: N802
    """deploy/local.yaml with tracing on, to an OTLP collector in this test process."""
    global RECEIVER
    RECEIVER = GrpcReceiver()
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    raw["applications"][0]["args"]["tracing"] = {"endpoint": RECEIVER.endpoint, "export_interval_ms": 200}
    path = folder / "local-traced.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # guides keep their order (ListModels lists them so)
    return str(path)


@pytest.fixture(scope="module")
def receiver(server):
    yield RECEIVER
    RECEIVER.stop()

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
             "Who wrote Hamlet?", "What is the largest planet?", "Translate 'cat' to French.",
             "What color is the sky?", "How many legs does a spider have?"]


def chat(question: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)],
                              sampling=pb.SamplingParams(**sampling))


def test_greedy_chat_answer_contains_paris(stub):
    response = stub.Generate(chat(QUESTIONS[0], temperature=0, max_tokens=32), timeout=120)
    assert "Paris" in response.text
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert response.model == "smollm2-135m-instruct"
    assert response.usage.completion_tokens == len(response.token_ids)
    assert response.usage.prompt_tokens > 0
    assert response.usage.forward_passes["smollm2-135m-instruct"] == len(response.token_ids)


def test_streamed_text_equals_unary_text(stub):
    request = chat("Write two sentences about the ocean.", temperature=0, max_tokens=48)
    unary = stub.Generate(request, timeout=120)
    messages = list(stub.GenerateStream(request, timeout=120))
    assert len(messages) > 1
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == unary.finish_reason
    assert messages[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_same_seed_same_sample(stub):
    request = chat("Invent a name for a cat.", temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
    first, second = (stub.Generate(request, timeout=120) for _ in range(2))
    assert first.text == second.text and first.seed == second.seed == 42
    other = stub.Generate(chat("Invent a name for a cat.", temperature=1.0, top_p=0.95, seed=43, max_tokens=24),
                          timeout=120)
    assert other.token_ids != first.token_ids


def test_a_drawn_seed_is_reported_and_reproduces_the_sample(stub):
    def request(**seed) -> pb.GenerateRequest:
        return chat("Invent a name for a cat.", temperature=1.0, max_tokens=8, ignore_eos=True, **seed)

    drawn = stub.Generate(request(), timeout=120)
    messages = list(stub.GenerateStream(request(), timeout=120))
    assert drawn.seed and messages[-1].seed and drawn.seed != messages[-1].seed
    assert not any(m.seed for m in messages[:-1])
    again = stub.Generate(request(seed=drawn.seed), timeout=120)
    assert (again.seed, again.token_ids) == (drawn.seed, drawn.token_ids)


def test_stop_strings_end_the_text_before_the_first_one(stub):
    free = stub.Generate(chat(QUESTIONS[1], temperature=0, max_tokens=24), timeout=120)
    words = free.text.split()
    assert len(words) >= 4, free.text
    first, later = words[2], words[-1]  # the earliest occurrence of any stop string wins, whatever their order
    request = chat(QUESTIONS[1], temperature=0, max_tokens=24, stop=[later, "never in this text ~~", first])
    expected = free.text[:min(free.text.index(first), free.text.index(later))]
    stopped = stub.Generate(request, timeout=120)
    assert stopped.text == expected
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert len(stopped.token_ids) < len(free.token_ids)
    messages = list(stub.GenerateStream(request, timeout=120))
    assert "".join(m.text for m in messages) == expected and messages[-1].finish_reason == pb.FINISH_REASON_STOP


def test_top_k_1_samples_the_greedy_tokens(stub):
    def tokens(**sampling):
        return stub.Generate(chat(QUESTIONS[3], max_tokens=8, ignore_eos=True, **sampling), timeout=120).token_ids

    greedy = tokens(temperature=0)
    assert tokens(temperature=1.5, top_k=1, seed=1) == greedy
    assert tokens(temperature=1.5, seed=1) != greedy  # so top_k is what made it greedy


def test_request_id_is_echoed_when_given_and_generated_when_not(stub):
    request = chat(QUESTIONS[2], temperature=0, max_tokens=2, ignore_eos=True)
    request.request_id = "client-chosen-id-7"
    assert stub.Generate(request, timeout=60).request_id == "client-chosen-id-7"
    assert {m.request_id for m in stub.GenerateStream(request, timeout=60)} == {"client-chosen-id-7"}
    request.request_id = ""
    generated = stub.Generate(request, timeout=60).request_id
    streamed = {m.request_id for m in stub.GenerateStream(request, timeout=60)}
    assert generated and len(streamed) == 1 and "" not in streamed and generated not in streamed


def trailing_request_id(call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("x-request-id")


def test_request_id_from_the_x_request_id_metadata_comes_back_in_the_trailing_metadata(stub):
    request = chat(QUESTIONS[2], temperature=0, max_tokens=2, ignore_eos=True)
    response, call = stub.Generate.with_call(request, metadata=(("x-request-id", "from-metadata-1"),), timeout=60)
    assert response.request_id == trailing_request_id(call) == "from-metadata-1"
    stream = stub.GenerateStream(request, metadata=(("x-request-id", "from-metadata-2"),), timeout=60)
    assert {m.request_id for m in stream} == {"from-metadata-2"} and trailing_request_id(stream) == "from-metadata-2"
    request.request_id = "from-the-message"  # the message's field wins over the metadata
    response, call = stub.Generate.with_call(request, metadata=(("x-request-id", "ignored"),), timeout=60)
    assert response.request_id == trailing_request_id(call) == "from-the-message"
    # Failures carry the id too, a generated one when the client sent none.
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(model="no-such-model", prompt="x"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(trailing_request_id(info.value)) == 32
    for bad in ("x" * 129, "has space", "é"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt="x", request_id=bad), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("request_id: 1-128 printable ASCII"), bad


def test_eight_concurrent_greedy_requests_equal_their_solo_runs(stub):
    requests = [chat(q, temperature=0, max_tokens=16) for q in QUESTIONS]
    solo = [stub.Generate(r, timeout=120).text for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: stub.Generate(r, timeout=300).text, requests))
    assert together == solo


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "chorus.v1.Decoding"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_decoding_service(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"chorus.v1.Decoding", "grpc.health.v1.Health"} <= services


def test_list_models(stub):
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == ["smollm2-135m-instruct", "exit8", "self", "concise", "french"]
    model = models[0]
    assert model.is_default and model.role == "base" and model.engine == "transformers"
    assert model.other_contexts == "rows"
    assert model.max_model_len == 2048
    assert not any(m.is_default for m in models[1:])


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(model="no-such-model", prompt="hi"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details()


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=-1)), "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-0.5)), "sampling.temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=100_000)), "sampling.max_tokens"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]), "messages[0].role"),
    (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]), "prompt"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["."] * 17)), "sampling.stop"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["ok", ""])), "sampling.stop[1]"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["x" * 257])), "sampling.stop[0]"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub, request_, field):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request_, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field), info.value.details()


@pytest.mark.parametrize("request_, field, limit", [
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=8193)), "sampling.max_tokens",
     "max_tokens"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")] * 257), "messages", "max_messages"),
    (pb.GenerateRequest(prompt="x" * 1_000_001), "prompt", "max_prompt_chars"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * 600_000)] * 2), "messages",
     "max_prompt_chars"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["."] * 500)), "sampling.stop",
     "max_stop_strings"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["x" * 257])), "sampling.stop[0]",
     "max_stop_string_chars"),
])
def test_requests_over_the_front_end_limits_are_refused_naming_the_limit(stub, server, request_, field, limit):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: at most ")
    assert f"(frontend.limits.{limit})" in info.value.details()


def test_a_message_over_max_message_bytes_is_resource_exhausted_by_grpc(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt="x" * (4 * 2**20 + 1)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()


def test_each_request_leaves_one_log_line(stub, server):
    stub.Generate(pb.GenerateRequest(prompt="Hello", request_id="log-line-check",
                                     sampling=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)),
                  timeout=60)
    line = wait_for_log_line(server, "id=log-line-check ")
    for part in ("rpc=Generate", "model=smollm2-135m-instruct", "strategy=plain", "completion_tokens=4",
                 "latency_ms=", "status=OK"):
        assert part in line
    assert server.log().count("id=log-line-check ") == 1


def test_deadline_exceeded_stops_the_work_and_the_server_keeps_serving(stub, server):
    long_request = chat("Count from one to one thousand.", max_tokens=900, ignore_eos=True)
    long_request.request_id = "deadline-check"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(long_request, timeout=1.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    # The engine dropped the sequence: nothing is left running or waiting.
    for _ in range(50):
        model = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
        if model.running_requests == 0 and model.waiting_requests == 0:
            break
        time.sleep(0.2)
    assert (model.running_requests, model.waiting_requests) == (0, 0)
    assert "status=DEADLINE_EXCEEDED" in wait_for_log_line(server, "id=deadline-check ")
    assert "Paris" in stub.Generate(chat(QUESTIONS[0], temperature=0, max_tokens=32), timeout=120).text


def test_cancelled_stream_stops_the_work(stub, server):
    request = chat("Tell me a very long story.", max_tokens=900, ignore_eos=True)
    request.request_id = "cancel-check"
    stream = stub.GenerateStream(request, timeout=120)
    next(stream)
    stream.cancel()
    for _ in range(50):
        model = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
        if model.running_requests == 0:
            break
        time.sleep(0.2)
    assert model.running_requests == 0
    assert "status=CANCELLED" in wait_for_log_line(server, "id=cancel-check ")


def test_cli_generate_and_models(server):
    import json
    import subprocess
    import sys

    def chorus(*args):
        return subprocess.run([sys.executable, "-m", "chorus.cli", *args, "--address", server.address],
                              capture_output=True, text=True, timeout=120)

    answer = chorus("generate", "--chat", "What is the capital of France?", "--temperature", "0", "--stream")
    assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stderr
    listed = json.loads(chorus("models", "--json").stdout)
    assert listed["models"][0]["name"] == "smollm2-135m-instruct"
    picked = chorus("generate", "--chat", "What is 3 + 4?", "--strategy", "best_of_n", "--param", "n=2",
                    "--param", "seed=1", "--param", "verdict=score", "--max-tokens", "12")
    assert picked.returncode == 0 and picked.stdout.strip(), picked.stderr
    assert "winner: candidate" in picked.stderr and "candidate 1 (answer" in picked.stderr
    contrasted = chorus("generate", "--chat", "What is 3 + 4?", "--strategy", "contrastive", "--strategy-json",
                        '{"mode": "MODE_USCD", "uncertainty_threshold": 0.003, "contrast_context": {"prompt": "Hi"}}',
                        "--temperature", "0",
                        "--max-tokens", "8", "--ignore-eos", "--stream")
    assert contrasted.returncode == 0 and contrasted.stdout.strip(), contrasted.stderr
    report = json.loads(contrasted.stderr.split("[contrastive] ", 1)[1])
    assert report["mode"] == "uscd" and report["steps"] == 8, report
    unknown = chorus("generate", "hi", "--strategy", "refusal_steering", "--param", "treshold=0.2")
    assert unknown.returncode == 2 and "treshold: unknown field; RefusalSteering has mode, threshold" in unknown.stderr
    refused = chorus("generate", "hi", "--top-p", "2")
    assert refused.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in refused.stderr


def scrape(server) -> dict[str, list]:
    """The Prometheus samples of Chorus's metrics from the server's Ray metrics port, by metric family."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("ray_chorus_")}


def total(samples, name: str, **tags) -> float:
    return sum(s.value for s in samples if s.name == name and tags.items() <= s.labels.items())


def test_metrics_reach_ray_s_prometheus_port_and_the_dashboard_charts_only_exported_ones(stub, server):
    plain = chat(QUESTIONS[0], temperature=0, max_tokens=5, ignore_eos=True)
    stub.Generate(plain, timeout=60)
    list(stub.GenerateStream(plain, timeout=60))
    status_of(lambda: stub.Generate(pb.GenerateRequest(model="no-such-model", prompt="x"), timeout=30))
    deadline = time.monotonic() + 90  # Ray's agent exports what replicas recorded every few seconds
    while True:
        families = scrape(server)
        requests = families.get("ray_chorus_requests", [])
        if (total(requests, "ray_chorus_requests_total", rpc="GenerateStream", status="OK") >= 1
                and total(requests, "ray_chorus_requests_total", status="NOT_FOUND") >= 1
                and "ray_chorus_inter_token_latency_seconds" in families):
            break
        assert time.monotonic() < deadline, f"chorus metrics not exported: {sorted(families)}"
        time.sleep(2)
    assert total(requests, "ray_chorus_requests_total", rpc="Generate", strategy="plain", status="OK") >= 1
    latency = families["ray_chorus_request_latency_seconds"]
    assert total(latency, "ray_chorus_request_latency_seconds_count", rpc="Generate") >= 1
    assert total(latency, "ray_chorus_request_latency_seconds_sum", rpc="Generate") > 0
    assert total(families["ray_chorus_completion_tokens"], "ray_chorus_completion_tokens_total") >= 10
    assert total(families["ray_chorus_prompt_tokens"], "ray_chorus_prompt_tokens_total") > 0
    assert total(families["ray_chorus_forward_passes"], "ray_chorus_forward_passes_total",
                 model="smollm2-135m-instruct") >= 10
    first = families["ray_chorus_time_to_first_token_seconds"]
    assert total(first, "ray_chorus_time_to_first_token_seconds_count", group="smollm2", strategy="plain") >= 2
    # 4 tokens after the first of each of the two requests, at least
    assert total(families["ray_chorus_inter_token_latency_seconds"], "ray_chorus_inter_token_latency_seconds_count",
                 group="smollm2") >= 8
    for gauge in ("ray_chorus_running_sequences", "ray_chorus_waiting_requests", "ray_chorus_kv_cache_usage"):
        [sample] = [s for s in families[gauge] if s.labels.get("group") == "smollm2"]
        assert 0 <= sample.value and sample.labels["deployment"] == "group-smollm2", gauge
    assert families["ray_chorus_kv_cache_usage"][0].value <= 1
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    charted = {re.sub(r"_(total|bucket|count|sum)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"ray_chorus_\w+", target["expr"])}
    assert charted and charted <= set(families), charted - set(families)
    assert f"http://127.0.0.1:{server.metrics_port}/metrics" in server.log(), "the URL is printed at start"


def test_a_short_soak_loses_no_request_and_leaves_nothing_running(stub, server):
    """bench/soak.py (`make soak`, 10 minutes) for 12 s: 8 clients of mixed strategies, cancellations and
    deadlines."""
    from bench.soak import check_server_log, soak, summarize

    run = soak(server.address, server.proc.pid, server.metrics_port, duration_s=12, clients=8, sample_s=1.5, seed=1)
    wait_for_load(stub, (0, 0))
    time.sleep(1)  # the last log lines
    summary = summarize(run, check_server_log(run["outcomes"], server.log()))
    assert summary["requests"] >= 10, summary["by_status"]
    assert (summary["lost"], summary["hung"], summary["internal"], summary["clients_still_running"]) == ([], [], 0, 0)
    assert summary["by_status"].get("OK", 0) >= 8 and len(summary["by_kind"]) >= 5, summary
    assert len(run["samples"]) >= 5 and all(len(s["rss"]) >= 4 for s in run["samples"])
    assert any(s.get("kv_cache_usage", 0) > 0 for s in run["samples"]), "the KV cache was in use"


def traced(trace_id: str) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-{os.urandom(8).hex()}-01"),)


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def test_a_traced_request_links_the_client_the_front_end_the_group_call_and_the_engine_phases(stub, receiver):
    trace_id = os.urandom(16).hex()
    metadata = traced(trace_id)
    request = chat(QUESTIONS[0], temperature=0, max_tokens=8)
    request.contrastive.SetInParent()
    response = stub.Generate(request, metadata=metadata, timeout=120)
    names = {"chorus.v1.Decoding/Generate", "chorus.group_call", "chorus.group.generate", "chorus.engine.queue",
             "chorus.engine.prefill", "chorus.engine.decode"}
    spans = by_name(receiver.wait_for(names, bytes.fromhex(trace_id)))
    assert set(spans) == names
    rpc, call, replica = (spans[n] for n in ("chorus.v1.Decoding/Generate", "chorus.group_call",
                                              "chorus.group.generate"))
    assert rpc.span.parent_span_id.hex() == metadata[0][1].split("-")[2]  # the client's span
    assert call.span.parent_span_id == rpc.span.span_id and replica.span.parent_span_id == call.span.span_id
    phases = [spans[f"chorus.engine.{p}"] for p in ("queue", "prefill", "decode")]
    assert all(p.span.parent_span_id == replica.span.span_id for p in phases)
    assert [s.resource["chorus.component"] for s in (rpc, call, replica)] == ["frontend", "frontend", "group:smollm2"]
    # Nested in time, the phases one after the other (one machine: one clock).
    bounds = [(s.span.start_time_unix_nano, s.span.end_time_unix_nano) for s in (rpc, call, replica)]
    assert bounds[0][0] <= bounds[1][0] <= bounds[2][0] and bounds[2][1] <= bounds[1][1] <= bounds[0][1]
    edges = [t for p in phases for t in (p.span.start_time_unix_nano, p.span.end_time_unix_nano)]
    assert edges == sorted(edges) and bounds[2][0] <= edges[0] and edges[-1] <= bounds[2][1]
    assert rpc.attributes["chorus.request_id"] == response.request_id == replica.attributes["chorus.request_id"]
    assert (rpc.attributes["chorus.strategy"], rpc.attributes["chorus.completion_tokens"]) == ("contrastive", 8)
    assert rpc.attributes["chorus.status"] == "OK" and call.attributes["chorus.replica"] == rpc.attributes[
        "chorus.replica"] == replica.attributes["chorus.replica"]
    decode = phases[2].attributes
    assert {model: decode[f"chorus.forward_passes.{model}"] for model in response.usage.forward_passes} == dict(
        response.usage.forward_passes)


def test_request_level_strategies_reranking_and_refused_requests_are_traced(stub, receiver):
    ids = {name: os.urandom(16).hex() for name in ("best_of_n", "rerank", "refused")}
    stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=QUESTIONS[2])],
                                     sampling=pb.SamplingParams(max_tokens=8, temperature=0),
                                     # The general template has no answer teams: the one match is always judged.
                                     best_of_n=pb.BestOfN(n=2, verdict=pb.BestOfN.VERDICT_SCORE,
                                                          template=pb.BestOfN.TEMPLATE_GENERAL)),
                  metadata=traced(ids["best_of_n"]), timeout=300)
    stub.Rerank(pb.RerankRequest(query="What is the capital of France?", passages=[
        "Bananas are rich in potassium.", "Paris is the capital of France.", "Cats sleep a lot."]),
        metadata=traced(ids["rerank"]), timeout=300)
    with pytest.raises(grpc.RpcError):
        stub.Generate(chat(QUESTIONS[0], temperature=-1), metadata=traced(ids["refused"]), timeout=30)

    spans = by_name(receiver.wait_for({"chorus.group.generate", "chorus.best_of_n.candidates",
                                       "chorus.best_of_n.round"}, bytes.fromhex(ids["best_of_n"])))
    replica = spans["chorus.group.generate"].span
    assert spans["chorus.best_of_n.candidates"].span.parent_span_id == replica.span_id
    assert spans["chorus.best_of_n.round"].span.parent_span_id == replica.span_id
    assert spans["chorus.best_of_n.round"].attributes == {"chorus.matches": 1, "chorus.judge_calls": 1,
                                                          "chorus.status": "OK"}

    spans = by_name(receiver.wait_for({"chorus.v1.Decoding/Rerank", "chorus.group.rerank", "chorus.rerank.window"},
                                      bytes.fromhex(ids["rerank"])))
    assert spans["chorus.rerank.window"].span.parent_span_id == spans["chorus.group.rerank"].span.span_id
    assert spans["chorus.rerank.window"].attributes["chorus.window.end"] == 3

    [refused] = receiver.wait_for({"chorus.v1.Decoding/Generate"}, bytes.fromhex(ids["refused"]))
    assert refused.attributes["chorus.status"] == "INVALID_ARGUMENT"
    assert refused.span.status.message.startswith("INVALID_ARGUMENT: ") and "temperature" in refused.span.status.message
    time.sleep(1)  # nothing else of it arrives: it never reached a group
    assert [s.name for s in receiver.spans(bytes.fromhex(ids["refused"]))] == ["chorus.v1.Decoding/Generate"]
