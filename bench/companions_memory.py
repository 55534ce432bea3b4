"""Memory of vLLM's processes with fusion on, with and without companion requests (`vllm_companions`).

    .venv/bin/python -m bench.companions_memory [--config deploy/local-vllm.yaml] [--name companions-memory]

For each setting, in a fresh child process: the config's vLLM group in process (max_batch_size as configured,
`vllm_companions` off, then on), one dynamic-fusion request of 16 greedy tokens, then the resident memory (VmRSS)
of vLLM's engine-core and worker processes (where the fusion processor and, without companions, its transformers
copy of the base live). Writes <out>/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Describe a cat in one line."


def vllm_rss_kib() -> dict[str, int]:
    """VmRSS of this process's descendants whose command line names vLLM's engine core or worker, by name."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if command.startswith("VLLM::") and _descends_from(int(entry.name), os.getpid()):
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            found[command] = found.get(command, 0) + rss
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if pid == ancestor:
            return True
    return False


async def measure(config_path: str, companions: bool) -> dict:
    from decoding.chat import ChatMessage
    from decoding.sampling import SamplingParams
    from server.config import load_deploy_file
    from server.engines.base import GenerationRequest
    from decoding.strategies import LogitFusionParams
    from server.engines.vllm_engine import VLLMEngine

    config = load_deploy_file(ROOT / config_path).chorus
    group = next(g for g in config.groups.values() if g.base == config.default_model)
    group = dataclasses.replace(group, vllm_companions=companions)
    engine = VLLMEngine(config.models[group.base], group, config)
    try:
        request = GenerationRequest(
            request_id="memory", messages=(ChatMessage("user", QUESTION),),
            sampling=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
            strategy=LogitFusionParams())
        tokens = [t async for chunk in engine.generate(request) for t in chunk.token_ids]
        return {"vllm_companions": companions, "max_batch_size": group.max_batch_size, "tokens": len(tokens),
                "rss_kib": vllm_rss_kib()}
    finally:
        engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deploy/local-vllm.yaml")
    parser.add_argument("--name", default="companions-memory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--one", choices=["off", "on"], help=argparse.SUPPRESS)  # the child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(args.config, args.one == "on"))))
        return 0
    runs = []
    for setting in ("off", "on"):
        child = subprocess.run([sys.executable, "-m", "bench.companions_memory", "--config", args.config,
                                "--one", setting], cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(runs[-1])
    report = {"config": args.config, "what": __doc__.splitlines()[0], "runs": runs,
              "command": f"python -m bench.companions_memory --config {args.config} --name {args.name}"}
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
