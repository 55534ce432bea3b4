"""`chorus`: call a running server and, with the server installed (`pip install 'chorus[server]'`), run one.

    chorus generate "Hello" [--chat] [--stream] [--strategy NAME [--param KEY=VALUE ...] | --strategy-json JSON]
    chorus rerank --query Q --passages FILE.jsonl    rank passages for a query
    chorus models                                    the server's models and strategies
    chorus health                                    the server's health status (exit 0 when SERVING)
        (each takes --address, --timeout, --retries, and --tls / --tls-ca PEM [--tls-cert PEM --tls-key PEM] and
        --token for a server with TLS and tokens)
    chorus serve | fetch-models | install-target | calibrate-entropy ...
                                                     the server's commands (server/cli.py; `chorus serve --help`)

The calling commands go through chorus.client; the server commands live in server/cli.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from google.protobuf import json_format

from chorus.client import DEFAULT_ADDRESS, STRATEGIES, Client, RequestError, parse_param

# Where the client commands take a bearer token from when --token is not given.
TOKEN_ENV = "CHORUS_TOKEN"


def _client(args) -> Client:
    return Client(args.address, tls=args.tls, ca_certificate=args.tls_ca, client_certificate=args.tls_cert,
                  client_key=args.tls_key, token=args.token or os.environ.get(TOKEN_ENV), timeout=args.timeout,
                  retries=args.retries)


def strategy_params(args) -> dict:
    """The strategy's parameters from --param (typed by the strategy's message) or --strategy-json."""
    if args.strategy is None:
        if args.params or args.strategy_json:
            raise ValueError("--param and --strategy-json need --strategy")
        return {}
    if args.params and args.strategy_json:
        raise ValueError("give the parameters with --param or with --strategy-json, not both")
    if args.strategy_json:
        try:
            params = json.loads(args.strategy_json)
        except json.JSONDecodeError as error:
            raise ValueError(f"--strategy-json: {error}") from None
        if not isinstance(params, dict):
            raise ValueError("--strategy-json: expected a JSON object of the strategy's fields")
        return params
    params: dict = {}
    for assignment in args.params:
        parse_param(STRATEGIES[args.strategy].DESCRIPTOR, assignment, params)
    return params


def report_text(response) -> str | None:
    """The strategy's report of a (last) response: best-of-N's as its bracket, the others as one JSON line."""
    kind = response.report.WhichOneof("report")
    if kind is None:
        return None
    report = getattr(response.report, kind)
    if kind == "best_of_n":
        return bracket_text(report)
    return f"[{kind}] " + json_format.MessageToJson(report, indent=None, preserving_proto_field_name=True)


def bracket_text(report) -> str:
    """A best-of-N report as lines: the candidates, then each match (or the pointwise scores)."""
    lines = [f"best-of-{len(report.candidates)}: {report.selection}, {report.verdict} verdicts"
             f"{', both orders' if report.both_orders else ''}, judge {report.judge}, {report.judge_calls} judge "
             f"calls, {report.judge_tokens} judge tokens; winner: candidate {report.winner}"]
    for i, c in enumerate(report.candidates):
        first_line = c.text.strip().splitlines()[0][:70] if c.text.strip() else ""
        lines.append(f"  candidate {i} (answer {c.answer or '-'}, {len(c.token_ids)} tokens): {first_line}")
    for bye in report.byes:
        lines.append(f"  round {bye.round}: candidate {bye.candidate} has a bye")
    for m in report.bracket:
        outcome = f"{m.winner} advances" if m.HasField("winner") else "both eliminated"
        how = ", ".join(j.parse for j in m.judgements) or "same answer: a coin, no call"
        lines.append(f"  round {m.round}: {m.a} vs {m.b}: scores {m.a_score:.2f} / {m.b_score:.2f} ({how}); {outcome}")
    for r in report.fallback_rounds:
        lines.append(f"  round {r} eliminated everyone: the survivor was drawn at random")
    for i, score in enumerate(report.pointwise_scores):
        lines.append(f"  candidate {i}: p(Correct) = {score:.3f}")
    return "\n".join(lines)


async def _generate(args, client: Client) -> int:
    fields = dict(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos)
    if args.strategy is not None:
        fields[args.strategy] = strategy_params(args)
    if args.chat:
        fields["messages"] = [("user", args.prompt)]
    else:
        fields["prompt"] = args.prompt
    if not args.stream:
        response = await client.generate(**fields)
        print(json_format.MessageToJson(response) if args.json else response.text)
    else:
        async for response in client.generate_stream(**fields):
            if args.json:
                print(json_format.MessageToJson(response, indent=None), flush=True)
            elif response.HasField("progress"):
                if args.verbose:
                    progress = response.progress.best_of_n
                    print(f"[best-of-n] {progress.phase} {progress.round or ''}: {progress.remaining} left, "
                          f"{progress.judge_calls} judge calls", file=sys.stderr, flush=True)
            else:
                print(response.text, end="", flush=True)
        if not args.json:
            print()
    report = None if args.json else report_text(response)
    if report:
        print(report, file=sys.stderr)
    return 0


def read_passages(path: str) -> list[str]:
    """A JSON Lines file of passages: each line a JSON string, or an object with "text" or "content" (the shape of
    MS MARCO / rank_llm hits)."""
    passages = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number}: not JSON ({error})") from None
            text = item.get("text", item.get("content")) if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"line {number}: expected a string or an object with a \"text\" or \"content\" "
                                 "string")
            passages.append(text)
    return passages


async def _rerank(args, client: Client) -> int:
    try:
        passages = read_passages(args.passages)
    except (OSError, ValueError) as error:
        raise ValueError(f"--passages {args.passages}: {error}") from None
    response = await client.rerank(args.query, passages, model=args.model, top_n=args.top_n, mode=args.mode,
                                   window_size=args.window_size, stride=args.stride, permutations=args.permutations,
                                   aggregation=args.aggregation, max_passage_words=args.max_passage_words,
                                   seed=args.seed)
    if args.json:
        print(json_format.MessageToJson(response))
        return 0
    for place, index in enumerate(response.ranking, start=1):
        text = " ".join(passages[index].split())
        print(f"{place:4d}. [{index}] {text[:100]}{'…' if len(text) > 100 else ''}")
    usage = response.usage
    print(f"{len(response.windows)} windows, {sum(usage.forward_passes.values())} forward passes, "
          f"{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} written, "
          f"{sum(w.latency_ms for w in response.windows):.0f} ms on {response.model}", file=sys.stderr)
    return 0


async def _models(args, client: Client) -> int:
    response = await client.list_models()
    if args.json:
        print(json_format.MessageToJson(response))
        return 0
    for m in response.models:
        available = [s.strategy for s in m.strategies if s.available]
        print(f"{m.name}{' (default)' if m.is_default else ''}: {m.role}, group {m.group}, {m.engine} on "
              f"{m.device} {m.dtype}, context {m.max_model_len}; strategies: {', '.join(available)}; "
              f"running {m.running_requests}, waiting {m.waiting_requests}"
              f"{f' on {len(m.replicas)} replicas' if m.replicas else ''}")
    return 0


async def _health(args, client: Client) -> int:
    status = await client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


async def _call(command, args) -> int:
    async with _client(args) as client:
        return await command(args, client)


def _calling(command):
    def run(args) -> int:
        try:
            return asyncio.run(_call(command, args))
        except RequestError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as error:
            print(f"chorus {args.command}: {error}", file=sys.stderr)
            return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a running server")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--model", default="", help="base model (default: the server's default)")
    gen.add_argument("--max-tokens", dest="max_tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", dest="top_p", type=float)
    gen.add_argument("--top-k", dest="top_k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", dest="ignore_eos", action="store_true")
    gen.add_argument("--strategy", choices=tuple(STRATEGIES),
                     help="the decoding strategy (default: plain sampling); its knobs are its message's fields in "
                     "protos/chorus/v1/decoding.proto, its report is printed to stderr after the text")
    gen.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                     help="a strategy parameter (repeatable): mode=uscd, alpha=0.1, experts=a,b, "
                     "thresholds=apology:0.2, sampling.temperature=0.7, refusal_prefixes='[{\"category\": ...}]'")
    gen.add_argument("--strategy-json", dest="strategy_json", metavar="JSON",
                     help="the strategy's parameters as one JSON object (the message's JSON form)")
    gen.add_argument("--json", action="store_true", help="print the response message(s) as JSON")
    gen.add_argument("--verbose", action="store_true", help="streaming: print best-of-N's progress to stderr")
    gen.set_defaults(func=_calling(_generate))

    ranks = sub.add_parser("rerank", help="rank passages for a query with a running server (listwise, FIRST)")
    ranks.add_argument("--query", required=True)
    ranks.add_argument("--passages", required=True, metavar="FILE.jsonl",
                       help='one passage a line: a JSON string, or an object with "text" or "content"')
    ranks.add_argument("--model", default="", help="base model (default: the server's reranker)")
    ranks.add_argument("--top-n", dest="top_n", type=int, default=0, help="print only the best N (default: all)")
    ranks.add_argument("--mode", choices=("first_token", "generate"), help="default: first_token")
    ranks.add_argument("--window-size", dest="window_size", type=int, help="passages a window (default 20)")
    ranks.add_argument("--stride", type=int, help="how far the window moves (default 10)")
    ranks.add_argument("--permutations", type=int, help="shuffles a window (self-consistency; default 1: off)")
    ranks.add_argument("--aggregation", choices=("kemeny", "borda"), help="of the permutations (default: kemeny)")
    ranks.add_argument("--max-passage-words", dest="max_passage_words", type=int, help="default 300")
    ranks.add_argument("--seed", type=int, help="seed of the shuffles (default 0)")
    ranks.add_argument("--json", action="store_true", help="print the response as JSON")
    ranks.set_defaults(func=_calling(_rerank))

    models = sub.add_parser("models", help="list the server's models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_calling(_models))

    health = sub.add_parser("health", help="the server's gRPC health status; exit status 0 when SERVING")
    health.add_argument("--service", default="", help='"" (the server, default) or chorus.v1.Decoding')
    health.set_defaults(func=_calling(_health))

    for p in (gen, ranks, models, health):
        p.add_argument("--address", default=DEFAULT_ADDRESS)
        p.add_argument("--timeout", type=float, default=300, help="RPC deadline in seconds, over all attempts")
        p.add_argument("--retries", type=int, default=4, help="times a call that ends UNAVAILABLE is sent again "
                       "(0-4, exponential backoff from 1 s)")
        p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
        p.add_argument("--tls-ca", dest="tls_ca", metavar="PEM",
                       help="connect with TLS, trusting this CA (or the server's self-signed certificate)")
        p.add_argument("--tls-cert", dest="tls_cert", metavar="PEM",
                       help="a client certificate, for a server with frontend.tls.client_ca (with --tls-key)")
        p.add_argument("--tls-key", dest="tls_key", metavar="PEM", help="the client certificate's key")
        p.add_argument("--token", help=f"bearer token for a server with frontend.auth (default: ${TOKEN_ENV})")

    from server.cli import add_commands  # imports nothing the server needs until a command runs
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as error:
        if not getattr(args, "needs_server", False):
            raise
        print(f"chorus {args.command} needs the server installed: pip install 'chorus[server]' ({error})",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
