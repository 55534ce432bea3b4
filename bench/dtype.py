"""Which dtype to serve the embedded Qwen pair in on this CPU: float32 or bfloat16, by speed at equal greedy output.

    .venv/bin/python -m bench.dtype [--models qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]
        [--tokens 24] [--batch 8] [--name dtype]

For each model and dtype (the cached float32 checkpoint, loaded as is or cast to bfloat16 by transformers): greedy
`generate` of --tokens tokens on each of three chat prompts one at a time (batch 1; the outputs are compared across
dtypes), then one batch of --batch prompts (left padding). Reported: decode tokens/s at batch 1 (median over the
prompts) and at --batch, and whether the greedy outputs agree token for token. The dtypes run one after the other
in the same process (never competing for the cores). Writes <out>/<name>.json and prints a table. The deploy files
name the dtype this measurement picks (`models.<m>.dtype`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.run import ROOT

PROMPTS = ["What is the capital of France?",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?",
           "Write a Python function that returns the n-th Fibonacci number."]


def measure(name: str, dtype_name: str, tokens: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.models import resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path(f"embedded:{name}")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()

    def encode(texts: list[str]):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
        return tokenizer(chats, return_tensors="pt", padding=True)

    def generate(texts: list[str]) -> tuple[list[list[int]], float]:
        inputs = encode(texts)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return out[:, inputs["input_ids"].shape[1]:].tolist(), time.perf_counter() - started

    generate(PROMPTS[:1])  # warm-up
    single, outputs = [], []
    for text in PROMPTS:
        ids, seconds = generate([text])
        outputs.append(ids[0])
        single.append(tokens / seconds)
    texts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(batch)]
    _, seconds = generate(texts)
    return {"model": name, "dtype": dtype_name, "tokens_per_s_batch1": statistics.median(single),
            f"tokens_per_s_batch{batch}": batch * tokens / seconds, "outputs": outputs,
            "first_reply": tokenizer.decode(outputs[0], skip_special_tokens=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--name", default="dtype")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    started = time.time()
    results = []
    for name in args.models:
        for dtype_name in ("float32", "bfloat16"):
            print(f"[dtype] {name} {dtype_name} ...", flush=True)
            results.append(measure(name, dtype_name, args.tokens, args.batch))
            r = results[-1]
            print(f"[dtype]   batch 1 {r['tokens_per_s_batch1']:.2f} tok/s, batch {args.batch} "
                  f"{r[f'tokens_per_s_batch{args.batch}']:.2f} tok/s ({time.time() - started:.0f} s)", flush=True)
    lines = [f"| model | dtype | tok/s batch 1 | tok/s batch {args.batch} | greedy output equals float32 |",
             "| --- | --- | ---: | ---: | --- |"]
    for r in results:
        reference = next(x for x in results if x["model"] == r["model"] and x["dtype"] == "float32")
        same = sum(a == b for a, b in zip(r["outputs"], reference["outputs"]))
        r["prompts_equal_to_float32"] = same
        lines.append(f"| {r['model']} | {r['dtype']} | {r['tokens_per_s_batch1']:.2f} | "
                     f"{r[f'tokens_per_s_batch{args.batch}']:.2f} | {same}/{len(PROMPTS)} prompts |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"tokens": args.tokens, "batch": args.batch, "results": results, "run_s": time.time() - started}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
