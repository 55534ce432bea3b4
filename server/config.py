"""The Chorus config: models, model groups and the gRPC front end.

A deploy file (deploy/*.yaml) is a Ray Serve config file, so `serve deploy`, `serve run` and KubeRay's RayService
(serveConfigV2) understand it as it is. Chorus's own settings are the `args` of the application whose import path
is `server.app:build_app`; replicas, autoscaling and resources stay where Serve expects them, in `deployments`
(named `frontend` and `group-<group name>`). Everything is checked here, when the config loads, and a bad config
stops the server with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from pathlib import Path
from typing import Any

import yaml

from server.errors import ConfigError

APP_IMPORT_PATH = "server.app:build_app"
ENGINES = ("transformers", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
# vLLM engine arguments set from a model's own fields.
VLLM_RESERVED_ARGS = frozenset({"model", "dtype", "max_model_len"})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    # A local checkpoint folder, or "embedded:<name>" for a model `chorus fetch-models` provides.
    path: str
    engine: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"
    # Context length (prompt + completion) in tokens; None: the model's own (capped at 4096 on transformers).
    max_model_len: int | None = None
    # vLLM engine arguments (AsyncEngineArgs fields: gpu_memory_utilization, tensor_parallel_size, enforce_eager,
    # enable_prefix_caching, max_logprobs, ...); engine "vllm" only.
    vllm: dict = dataclasses.field(default_factory=dict)
    # Keep only the first k transformer layers (then the final norm and the head): an early-exit model, e.g. a
    # weak amateur for contrastive decoding. Shares its weights with the base model when both load `path` alike.
    early_exit_layers: int | None = None


GUIDE_ROLES = ("amateur", "small_base", "small", "judge", "reranker")  # and "expert:<task>"
# Roles that run on the group's base model itself (under the guide's system prompt, if it has one).
BASE_ONLY_ROLES = ("judge", "reranker")


@dataclasses.dataclass(frozen=True)
class GuideSpec:
    """A guide of a group's base model: a model (or the base itself) under an optional in-context system prompt.

    Roles: `amateur` (contrastive decoding's weak model), `small_base` (logit fusion's small base S; STEER's base
    model B), `expert:<task>` (a logit-fusion expert S_t, fine-tuned from small_base or made by its system prompt),
    `small` (entropy switching's small model, which writes while it is sure), `judge` (best-of-N's judge) and
    `reranker` (listwise reranking: its group is where a Rerank call without a model goes); these two run on the base
    model itself, under the guide's system prompt if it has one.
    """
    name: str
    model: str
    roles: tuple[str, ...]
    # An in-context expert: this text becomes the system message (chat requests) or is prepended to a raw prompt.
    system_prompt: str | None = None

    @property
    def expert_tasks(self) -> tuple[str, ...]:
        return tuple(r.split(":", 1)[1] for r in self.roles if r.startswith("expert:"))


@dataclasses.dataclass(frozen=True)
class RefusalSpec:
    """How a base model signals refusal. Either `tokens` (a model trained with refusal tokens: category → marker
    token string, plus `respond_token`) or `prefixes` (any model: category → reply prefixes whose first tokens are
    steered)."""
    tokens: dict[str, str] | None = None
    respond_token: str | None = None
    prefixes: dict[str, list[str]] | None = None


@dataclasses.dataclass(frozen=True)
class BestOfNSpec:
    """Limits on best-of-N requests (request-level: candidates and judge calls run on the group's base model)."""
    # Candidates per request (the request's `n`, default 4, may not exceed it).
    max_n: int = 8
    # Tokens the judge may write per comparison (GENERATE verdicts), also capped by the context left after its prompt.
    judge_max_tokens: int = 512
    # A request's worst case: n × the candidates' max_tokens + the judge calls it may make × judge_max_tokens.
    max_total_tokens: int = 32768


@dataclasses.dataclass(frozen=True)
class RerankSpec:
    """Limits on Rerank requests (listwise reranking on the group's base model)."""
    # Passages one request may send.
    max_passages: int = 1000
    # Shuffles per window a request may ask for (`permutations`).
    max_permutations: int = 8


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """A base model and its guides, hosted together in each replica of one Serve deployment."""
    name: str
    base: str
    # Sequences decoded together in one step (KV-cache slots per model).
    max_batch_size: int = 16
    # Requests queued beyond max_batch_size before RESOURCE_EXHAUSTED.
    max_waiting: int = 256
    # Transformers engine: tokens one step may feed per model, decode rows first, the rest for newcomers' prompt
    # chunks (prefilled together, a long prompt over several steps). Must exceed max_batch_size.
    max_step_tokens: int = 256
    # torch intra-op threads per replica; None: torch's default.
    torch_threads: int | None = None
    # Guides by name (GuideSpec): the models token-level strategies fuse with the base.
    guides: dict[str, GuideSpec] = dataclasses.field(default_factory=dict)
    refusal: RefusalSpec | None = None
    # Entropy switching's default threshold (bits) for this group's `small` guide and base; `chorus
    # calibrate-entropy` prints one for a target large-model fraction. None: requests must send a threshold.
    entropy_threshold: float | None = None
    # vLLM base: the base model's other contexts (in-context experts, USCD's lame prompt, STEER's negative context)
    # run as companion requests in vLLM's own batch (paged KV, vLLM's kernels, no transformers copy of the base)
    # instead of on a transformers copy of the base inside vLLM's engine core (server/engines/vllm_companions.py).
    vllm_companions: bool = False
    best_of_n: BestOfNSpec = BestOfNSpec()
    rerank: RerankSpec = RerankSpec()

    def guides_with_role(self, role: str) -> list[GuideSpec]:
        return [g for g in self.guides.values() if role in g.roles]

    @property
    def guide_models(self) -> list[str]:
        """Distinct models the guides run on, in declaration order (may include the base)."""
        return list(dict.fromkeys(g.model for g in self.guides.values()))

    @property
    def deployment_name(self) -> str:
        return f"group-{self.name}"


# frontend.host: bind each front-end replica to the IP address of the Ray node it runs on.
NODE_IP = "node-ip"


@dataclasses.dataclass(frozen=True)
class TLSSpec:
    """`frontend.tls`: the front end serves TLS only. Paths are absolute (the front end runs in a Ray worker with
    its own working directory), PEM files readable on every node a front end runs on."""
    # The server's certificate (chain) and its private key.
    certificate: str | None = None
    key: str | None = None
    # Clients must present a certificate this CA signed (mutual TLS); None: any client may connect.
    client_ca: str | None = None
    # Instead of certificate and key: a self-signed certificate for localhost, this machine's name, 127.0.0.1 and
    # ::1, made once into the cache (<cache>/tls/self-signed.crt; `chorus serve` prints the path) for local use.
    self_signed: bool = False


# The services a client reaches without a token unless `frontend.auth.open_services` says otherwise: health (for
# Kubernetes probes and load balancers) and reflection (grpcurl).
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


@dataclasses.dataclass(frozen=True)
class AuthSpec:
    """`frontend.auth`: every call needs the metadata `authorization: Bearer <token>` with one of these tokens,
    else UNAUTHENTICATED. Tokens never go in the deploy file: exactly one of `tokens_file` and `tokens_env`."""
    # An absolute path to a file with one token a line (blank lines and `#` comments skipped), read again when it
    # changes (checked at most once a second): a rotated Kubernetes Secret needs no restart.
    tokens_file: str | None = None
    # The name of an environment variable holding the token(s), comma-separated, set on every node a front end runs
    # on (the environment of `chorus serve` or `ray start`).
    tokens_env: str | None = None
    # Fully qualified gRPC services reachable without a token.
    open_services: tuple[str, ...] = OPEN_SERVICES


@dataclasses.dataclass(frozen=True)
class LimitsSpec:
    """`frontend.limits`: what one request may ask for, checked by the front end before the request reaches a
    group (INVALID_ARGUMENT or RESOURCE_EXHAUSTED, the message naming the limit). Each a whole number >= 1.
    The prompt's tokens are counted where the tokenizer is, in the group replica, before any engine work (against
    the model's context: the front end may run on a node without the model files)."""
    # The largest request message in bytes (gRPC's max_receive_message_length: larger ones end RESOURCE_EXHAUSTED
    # from gRPC itself, before Chorus reads them).
    max_message_bytes: int = 4 * 2**20
    # sampling.max_tokens at most.
    max_tokens: int = 8192
    # Characters of the prompt, or of all the messages' contents together.
    max_prompt_chars: int = 1_000_000
    # Chat messages in a request.
    max_messages: int = 256
    # Stop strings in a request, and characters in each.
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    # Generate, GenerateStream and Rerank calls in flight per client (its bearer token with frontend.auth, else its
    # IP address) on one front end; one more is RESOURCE_EXHAUSTED.
    max_rpcs_per_client: int = 256


@dataclasses.dataclass(frozen=True)
class FrontendSpec:
    # The address to listen on: an IP address or host name, "0.0.0.0" (every interface), or "node-ip" (the address
    # of the Ray node each front-end replica runs on: with one front end per node, every node serves the API).
    host: str = "127.0.0.1"
    port: int = 50051
    # Concurrent RPCs the front end accepts before answering RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024
    # On shutdown (SIGTERM/SIGINT to `chorus serve`, or Serve stopping the replica): health turns NOT_SERVING, new
    # RPCs are refused, and the RPCs in flight get this many seconds to finish before they are cancelled. The
    # frontend deployment's graceful_shutdown_timeout_s must exceed it.
    drain_grace_s: float = 15.0
    # TLS (TLSSpec) and bearer tokens (AuthSpec); both off when absent. A host other than a loopback address needs
    # at least one of them, or `insecure: true` to serve it in the clear on purpose.
    tls: TLSSpec | None = None
    auth: AuthSpec | None = None
    insecure: bool = False
    limits: LimitsSpec = dataclasses.field(default_factory=LimitsSpec)
    # A second port serving only grpc.health.v1, in the clear and without a token, on the same host: for probes that
    # cannot speak TLS (Kubernetes' gRPC probes). None: none.
    health_port: int | None = None


TRACING_PROTOCOLS = ("grpc", "http/protobuf")


@dataclasses.dataclass(frozen=True)
class TracingSpec:
    """`tracing`: OpenTelemetry spans of every request (the front end, its call to a group, and in the group replica
    the engine's phases and a request-level strategy's work), exported over OTLP by every front-end and group
    replica. Off when absent. The exporter also reads the standard OTEL_EXPORTER_OTLP_* environment variables
    (headers, certificates, compression) set where the replicas run."""
    # The collector: for "grpc" its address with a scheme, http://host:4317 (plaintext) or https://host:4317 (TLS);
    # for "http/protobuf" the full URL of the traces path, e.g. http://host:4318/v1/traces.
    endpoint: str
    protocol: str = "grpc"
    # The share of traces started here that are recorded, 0..1. A client that sends a W3C `traceparent` (gRPC
    # metadata) has its own sampling decision followed instead.
    sample_ratio: float = 1.0
    # The `service.name` of the spans' resource.
    service_name: str = "chorus"
    # How often finished spans are sent in batches (the OpenTelemetry SDK's BatchSpanProcessor delay).
    export_interval_ms: int = 5000


@dataclasses.dataclass(frozen=True)
class ChorusConfig:
    models: dict[str, ModelSpec]
    groups: dict[str, GroupSpec]
    default_model: str
    frontend: FrontendSpec
    tracing: TracingSpec | None = None

    @property
    def base_models(self) -> list[str]:
        return [g.base for g in self.groups.values()]

    @property
    def default_reranker(self) -> str:
        """Where a Rerank call without a model goes: the first group with a `reranker` guide, else the default
        model."""
        return next((g.base for g in self.groups.values() if g.guides_with_role("reranker")), self.default_model)


def _build(cls, where: str, raw: Any, **fixed):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    try:
        return cls(**fixed, **raw)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def parse_chorus_config(args: dict) -> ChorusConfig:
    """Validates the application args of a deploy file."""
    if not isinstance(args, dict):
        raise ConfigError("args: expected a mapping with models, groups, default_model, frontend")
    unknown = sorted(set(args) - {"models", "groups", "default_model", "frontend", "tracing"})
    if unknown:
        raise ConfigError(f"args: unknown key(s) {unknown}; allowed: default_model, frontend, groups, models, "
                          "tracing")
    models = {name: _build(ModelSpec, f"models.{name}", raw, name=name)
              for name, raw in (args.get("models") or {}).items()}
    groups = {name: _parse_group(name, raw) for name, raw in (args.get("groups") or {}).items()}
    frontend = _parse_frontend(args.get("frontend") or {})
    if not models:
        raise ConfigError("models: at least one model is required")
    if not groups:
        raise ConfigError("groups: at least one model group is required")
    for spec in models.values():
        if spec.engine not in ENGINES:
            raise ConfigError(f"models.{spec.name}.engine: {spec.engine!r} is not one of {ENGINES}")
        if spec.dtype not in DTYPES:
            raise ConfigError(f"models.{spec.name}.dtype: {spec.dtype!r} is not one of {DTYPES}")
        if spec.max_model_len is not None and spec.max_model_len < 2:
            raise ConfigError(f"models.{spec.name}.max_model_len: must be >= 2")
        if spec.engine == "vllm":
            _check_vllm_args(spec)
        elif spec.vllm:
            raise ConfigError(f"models.{spec.name}.vllm: engine arguments for vLLM, but the engine is {spec.engine!r}")
    bases: dict[str, str] = {}
    for group in groups.values():
        where = f"groups.{group.name}"
        if group.base not in models:
            raise ConfigError(f"{where}.base: {group.base!r} is not a configured model ({sorted(models)})")
        if group.base in bases:
            raise ConfigError(f"{where}.base: {group.base!r} is already the base of group {bases[group.base]!r}")
        bases[group.base] = group.name
        if group.max_batch_size < 1 or group.max_waiting < 0:
            raise ConfigError(f"{where}: max_batch_size must be >= 1 and max_waiting >= 0")
        if group.max_step_tokens <= group.max_batch_size:
            raise ConfigError(f"{where}.max_step_tokens: must exceed max_batch_size ({group.max_batch_size}) so a "
                              f"step always has room for prompt tokens, got {group.max_step_tokens}")
        for guide in group.guides.values():
            _check_guide(where, guide, models, group.base)
        if not isinstance(group.vllm_companions, bool):
            raise ConfigError(f"{where}.vllm_companions: true or false, got {group.vllm_companions!r}")
        if group.vllm_companions and models[group.base].engine != "vllm":
            raise ConfigError(f"{where}.vllm_companions: companion requests need a vLLM base; "
                              f"{group.base!r} runs on {models[group.base].engine!r}")
        threshold = group.entropy_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ConfigError(f"{where}.entropy_threshold: a finite number of bits, got {threshold!r}")
    for spec in models.values():
        if spec.early_exit_layers is not None and spec.early_exit_layers < 1:
            raise ConfigError(f"models.{spec.name}.early_exit_layers: must be >= 1")
        if spec.early_exit_layers is not None and spec.engine != "transformers":
            raise ConfigError(f"models.{spec.name}.early_exit_layers: needs engine 'transformers'")
    default = args.get("default_model") or next(iter(bases))
    if default not in bases:
        raise ConfigError(f"default_model: {default!r} is not the base model of any group ({sorted(bases)})")
    tracing = _parse_tracing(args["tracing"]) if args.get("tracing") is not None else None
    return ChorusConfig(models=models, groups=groups, default_model=default, frontend=frontend, tracing=tracing)


def _parse_tracing(raw: Any) -> TracingSpec:
    if isinstance(raw, dict) and "endpoint" not in raw:
        raise ConfigError("tracing.endpoint: required (the OTLP collector, e.g. http://127.0.0.1:4317)")
    spec = _build(TracingSpec, "tracing", raw)
    if not isinstance(spec.endpoint, str) or not spec.endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"tracing.endpoint: a URL starting with http:// or https://, got {spec.endpoint!r}")
    if spec.protocol not in TRACING_PROTOCOLS:
        raise ConfigError(f"tracing.protocol: one of {TRACING_PROTOCOLS}, got {spec.protocol!r}")
    ratio = spec.sample_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"tracing.sample_ratio: a number from 0 to 1, got {ratio!r}")
    if not isinstance(spec.service_name, str) or not spec.service_name:
        raise ConfigError(f"tracing.service_name: a non-empty string, got {spec.service_name!r}")
    interval = spec.export_interval_ms
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"tracing.export_interval_ms: a whole number of milliseconds >= 1, got {interval!r}")
    return spec


def _parse_frontend(raw: Any) -> FrontendSpec:
    if isinstance(raw, dict):
        raw = dict(raw)
        if raw.get("tls") is not None:
            raw["tls"] = _parse_tls(raw["tls"])
        if raw.get("auth") is not None:
            raw["auth"] = _parse_auth(raw["auth"])
        if "limits" in raw:
            raw["limits"] = _parse_limits(LimitsSpec, "frontend.limits", raw["limits"] or {})
    frontend = _build(FrontendSpec, "frontend", raw)
    grace = frontend.drain_grace_s
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < math.inf:
        raise ConfigError(f"frontend.drain_grace_s: seconds >= 0, got {grace!r}")
    if not isinstance(frontend.insecure, bool):
        raise ConfigError(f"frontend.insecure: true or false, got {frontend.insecure!r}")
    for field in ("port", "health_port"):
        port = getattr(frontend, field)
        if (port is not None or field == "port") and (isinstance(port, bool) or not isinstance(port, int)
                                                       or not 0 <= port < 65536):
            raise ConfigError(f"frontend.{field}: a port number 0-65535, got {port!r}")
    if frontend.health_port is not None and frontend.health_port == frontend.port:
        raise ConfigError(f"frontend.health_port: must differ from frontend.port ({frontend.port})")
    if frontend.host != NODE_IP:
        check_exposure(frontend, frontend.host)
    return frontend


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; every other address or name counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(frontend: FrontendSpec, host: str) -> None:
    """A non-loopback address needs TLS or tokens (or both), unless the deploy file says `insecure: true`."""
    if is_loopback(host) or frontend.insecure or frontend.tls is not None or frontend.auth is not None:
        return
    raise ConfigError(f"frontend.host {host!r} is reachable from other machines, and the front end has neither "
                      "frontend.tls nor frontend.auth: configure them (deploy/README.md, 'TLS and tokens'), or set "
                      "frontend.insecure: true to serve it in the clear on purpose")


def _absolute_path(where: str, value: Any) -> None:
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise ConfigError(f"{where}: an absolute path (the front end runs in a Ray worker with its own working "
                          f"directory), got {value!r}")


def _parse_tls(raw: Any) -> TLSSpec:
    tls = _build(TLSSpec, "frontend.tls", raw)
    if not isinstance(tls.self_signed, bool):
        raise ConfigError(f"frontend.tls.self_signed: true or false, got {tls.self_signed!r}")
    if tls.self_signed == (tls.certificate is not None or tls.key is not None):
        raise ConfigError("frontend.tls: give `certificate` and `key`, or `self_signed: true`, not both or neither")
    if not tls.self_signed and (tls.certificate is None or tls.key is None):
        raise ConfigError("frontend.tls: `certificate` and `key` go together")
    for field in ("certificate", "key", "client_ca"):
        if getattr(tls, field) is not None:
            _absolute_path(f"frontend.tls.{field}", getattr(tls, field))
    return tls


def _parse_auth(raw: Any) -> AuthSpec:
    if isinstance(raw, dict) and isinstance(raw.get("open_services"), list):
        raw = {**raw, "open_services": tuple(raw["open_services"])}
    if isinstance(raw, dict) and "tokens" in raw:
        raise ConfigError("frontend.auth.tokens: tokens never go in the deploy file; put them in a file "
                          "(tokens_file) or an environment variable (tokens_env)")
    auth = _build(AuthSpec, "frontend.auth", raw)
    if (auth.tokens_file is None) == (auth.tokens_env is None):
        raise ConfigError("frontend.auth: give exactly one of `tokens_file` and `tokens_env`")
    if auth.tokens_file is not None:
        _absolute_path("frontend.auth.tokens_file", auth.tokens_file)
    if auth.tokens_env is not None and not (isinstance(auth.tokens_env, str) and auth.tokens_env.isidentifier()):
        raise ConfigError(f"frontend.auth.tokens_env: the name of an environment variable, got {auth.tokens_env!r}")
    if not isinstance(auth.open_services, tuple) or not all(isinstance(s, str) and s for s in auth.open_services):
        raise ConfigError("frontend.auth.open_services: a list of fully qualified service names, e.g. "
                          f"{list(OPEN_SERVICES)}")
    return auth


def _parse_group(name: str, raw: Any) -> GroupSpec:
    where = f"groups.{name}"
    if isinstance(raw, dict):
        raw = dict(raw)
        guides = raw.pop("guides", None) or {}
        refusal = raw.pop("refusal", None)
        best_of_n = raw.pop("best_of_n", None)
        rerank = raw.pop("rerank", None)
        if not isinstance(guides, dict):
            raise ConfigError(f"{where}.guides: expected a mapping of guide name to guide")
        raw["guides"] = {g: _build(GuideSpec, f"{where}.guides.{g}", _tuple_roles(graw), name=g)
                         for g, graw in guides.items()}
        if refusal is not None:
            raw["refusal"] = _parse_refusal(f"{where}.refusal", refusal)
        if best_of_n is not None:
            raw["best_of_n"] = _parse_limits(BestOfNSpec, f"{where}.best_of_n", best_of_n)
        if rerank is not None:
            raw["rerank"] = _parse_limits(RerankSpec, f"{where}.rerank", rerank)
    return _build(GroupSpec, where, raw, name=name)


def _tuple_roles(raw: Any) -> Any:
    if isinstance(raw, dict) and isinstance(raw.get("roles"), list):
        return {**raw, "roles": tuple(raw["roles"])}
    return raw


def _check_guide(where: str, guide: GuideSpec, models: dict[str, ModelSpec], base: str) -> None:
    """A guide runs on transformers; on the base model itself (in-context guides) whatever the base's engine is
    (a vLLM base gets a transformers copy in the fusion processor)."""
    where = f"{where}.guides.{guide.name}"
    if guide.model not in models:
        raise ConfigError(f"{where}.model: {guide.model!r} is not a configured model ({sorted(models)})")
    if guide.model != base and models[guide.model].engine != "transformers":
        raise ConfigError(f"{where}.model: guides run on the transformers engine; {guide.model!r} has engine "
                          f"{models[guide.model].engine!r}")
    if not guide.roles or not isinstance(guide.roles, tuple):
        raise ConfigError(f"{where}.roles: a list of at least one role: {GUIDE_ROLES} or 'expert:<task>'")
    for role in BASE_ONLY_ROLES:
        if role in guide.roles and guide.model != base:
            raise ConfigError(f"{where}.roles: a {role} runs on the group's base model {base!r} (with its own system "
                              f"prompt if it needs one); {guide.model!r} is another model, and a {role} on another "
                              "model is not built yet")
    for role in guide.roles:
        if role not in GUIDE_ROLES and not (role.startswith("expert:") and len(role) > len("expert:")):
            raise ConfigError(f"{where}.roles: {role!r} is not one of {GUIDE_ROLES} or 'expert:<task>'")


def _parse_limits(cls, where: str, raw: Any):
    """A block of whole-number limits (best_of_n, rerank), each >= 1."""
    spec = _build(cls, where, raw)
    for field in dataclasses.fields(cls):
        value = getattr(spec, field.name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{field.name}: a whole number >= 1, got {value!r}")
    return spec


def _parse_refusal(where: str, raw: Any) -> RefusalSpec:
    spec = _build(RefusalSpec, where, raw)
    if (spec.tokens is None) == (spec.prefixes is None):
        raise ConfigError(f"{where}: give either `tokens` (with `respond_token`) or `prefixes`, not both or neither")
    if spec.tokens is not None and not (isinstance(spec.tokens, dict) and spec.tokens and spec.respond_token):
        raise ConfigError(f"{where}.tokens: a mapping category → marker token, with `respond_token` set")
    if spec.prefixes is not None and not (
            isinstance(spec.prefixes, dict) and spec.prefixes
            and all(isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)
                    for v in spec.prefixes.values())):
        raise ConfigError(f"{where}.prefixes: a mapping category → non-empty list of prefix strings")
    return spec


def _check_vllm_args(spec: ModelSpec) -> None:
    """What can be checked without vLLM; the argument names themselves are checked by the vLLM engine
    (server/engines/vllm_engine.py `check_engine_args`), which `chorus serve` runs before Ray starts."""
    if not isinstance(spec.vllm, dict):
        raise ConfigError(f"models.{spec.name}.vllm: a mapping of vLLM engine arguments")
    clashing = sorted(set(spec.vllm) & VLLM_RESERVED_ARGS)
    if clashing:
        raise ConfigError(f"models.{spec.name}.vllm: set {clashing} as the model's own fields, not here")


# Serve's default graceful_shutdown_timeout_s (ray.serve DeploymentConfig): how long Serve lets a stopping replica
# finish before it kills it.
SERVE_GRACEFUL_SHUTDOWN_S = 20.0


def _check_drain_fits(path: Path, app: dict, frontend: FrontendSpec) -> None:
    """The front end's drain must end before Serve gives up on the stopping replica and kills it."""
    entry = next((d for d in app.get("deployments") or [] if d.get("name") == "frontend"), {})
    timeout = entry.get("graceful_shutdown_timeout_s", SERVE_GRACEFUL_SHUTDOWN_S)
    if frontend.drain_grace_s >= timeout:
        raise ConfigError(f"{path}: frontend.drain_grace_s ({frontend.drain_grace_s:g} s) must be shorter than the "
                          f"frontend deployment's graceful_shutdown_timeout_s ({timeout:g} s), or Serve kills the "
                          "front end before its requests finish")


@dataclasses.dataclass(frozen=True)
class DeployFile:
    path: Path
    serve_config: dict  # the whole file, as Serve reads it
    app_name: str
    chorus: ChorusConfig


def load_deploy_file(path: str | Path, *, port: int | None = None, host: str | None = None) -> DeployFile:
    """Reads a deploy file, validates the Chorus app's args, and applies front-end address overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    apps = [a for a in (raw or {}).get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application with import_path {APP_IMPORT_PATH!r}")
    app = apps[0]
    args = app.setdefault("args", {})
    frontend = args.setdefault("frontend", {})
    if port is not None:
        frontend["port"] = port
    if host is not None:
        frontend["host"] = host
    chorus = parse_chorus_config(args)
    _check_drain_fits(path, app, chorus.frontend)
    return DeployFile(path=path, serve_config=raw, app_name=app.get("name", "default"), chorus=chorus)
