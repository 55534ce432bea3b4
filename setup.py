"""Generates the API stubs (`chorus.v1`) from protos/ whenever the package is built: a wheel, an sdist built into a
wheel, `pip install .` and `pip install -e .` all carry them, and the .proto itself for clients in other languages.
Everything else about the package is in pyproject.toml; `make proto` regenerates the stubs in place for developers."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
PACKAGE = Path("chorus", "v1")
INIT = '"""The Chorus API (chorus.v1.Decoding): stubs generated from decoding.proto when the package is built."""\n'


def generate_stubs(out: Path) -> None:
    """protoc (grpcio-tools, a build requirement) writes the message, service and typing stubs under `out`."""
    from grpc_tools import protoc

    sources = sorted((PROTOS / PACKAGE).glob("*.proto"))
    if not sources:
        raise RuntimeError(f"no .proto files in {PROTOS / PACKAGE}")
    package = out / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    arguments = ["grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}",
                 f"--pyi_out={out}", *map(str, sources)]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    (package / "__init__.py").write_text(INIT)
    for source in sources:
        (package / source.name).write_bytes(source.read_bytes())


class BuildPyWithStubs(build_py):
    """build_py, then the stubs: into the build folder for a wheel, into the source tree for an editable install
    (which imports from there)."""

    def run(self):
        super().run()
        generate_stubs(ROOT if self.editable_mode else Path(self.build_lib))


if __name__ == "__main__":  # as setuptools runs it; `make proto` imports generate_stubs
    setup(cmdclass={"build_py": BuildPyWithStubs})
