"""A typed asyncio client for a Chorus server (`Client`), and a blocking wrapper of it (`SyncClient`).

    async with Client("127.0.0.1:50051") as client:
        reply = await client.generate(messages=[("user", "What is 7 * 6?")], temperature=0, max_tokens=64,
                                      contrastive={"alpha": 0.1, "beta": 0.5})
        print(reply.text, reply.report.contrastive.contrasted_steps)
        async for message in client.generate_stream("Once upon a time", logit_fusion={}):
            print(message.text, end="")   # the last message carries finish_reason, usage and the report
        ranked = await client.rerank("what is a panda?", passages)   # ranked.ranking: indices, best first
        models = await client.list_models()
        assert await client.health() == "SERVING"

Requests and responses are the API's own protobuf messages (`chorus.v1.decoding_pb2`, typed by its .pyi stubs). A
strategy is a keyword argument named as its `GenerateRequest.strategy` field ("contrastive", "logit_fusion",
"entropy_switch", "refusal_steering", "best_of_n"), at most one a request, whose value is its message or a dict of
the message's fields (nested messages as dicts; enum values by name, with or without their prefix: "uscd" or
"MODE_USCD"): contrastive={"mode": "uscd"}, best_of_n=pb.BestOfN(n=8), logit_fusion={} for its defaults.

A call that does not end OK raises `RequestError`, which carries the status code, the server's message, the field
an INVALID_ARGUMENT names (from gRPC's rich error details) and the request id. UNAVAILABLE, and only UNAVAILABLE, is
retried with exponential backoff by gRPC's own retry policy (the channel's service config): a server that is
starting or restarting, a replica the server lost. A stream is retried only until its first message arrives.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from typing_extensions import TypedDict, Unpack

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE = pb.DESCRIPTOR.services_by_name["Decoding"].full_name
# The strategies of the API: GenerateRequest's `strategy` oneof, field name → message class.
STRATEGIES: dict[str, type[Message]] = {
    field.name: getattr(pb, field.message_type.name)
    for field in pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["strategy"].fields}
REQUEST_ID_METADATA = "x-request-id"
RETRY_BUFFER_BYTES = 16 << 20
# "Use the client's default deadline" (None means no deadline).
_DEFAULT: Any = object()


class RequestError(Exception):
    """A call that ended with a status other than OK: `code` (a grpc.StatusCode), `message` (the server's), `field`
    (the request field an INVALID_ARGUMENT names, dotted as in the .proto, e.g. "contrastive.alpha"; else None) and
    `request_id` (the server's id of the request, when it answered; else None)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None, request_id: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.field, self.request_id = code, message, field, request_id

    @classmethod
    def of(cls, error: grpc.RpcError) -> RequestError:
        trailing = tuple(error.trailing_metadata() or ())
        request_id = next((value for key, value in trailing if key == REQUEST_ID_METADATA), None)
        return cls(error.code(), error.details() or "", _violated_field(error), request_id)


def _violated_field(error: grpc.RpcError) -> str | None:
    """The first field of a google.rpc.BadRequest in the call's rich error details, if it has one."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that do not match the call's status: not the server's
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            if bad_request.field_violations:
                return bad_request.field_violations[0].field
    return None


def _enum_name(enum: EnumDescriptor, value: str, path: str) -> str:
    """An enum value's name from its full name or its name without the enum's prefix, any case ("uscd" and
    "MODE_USCD" both name MODE_USCD)."""
    names = [v.name for v in enum.values]
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind("_") + 1]
    wanted = value.upper()
    for name in names:
        if wanted in (name, name[len(prefix):]):
            return name
    raise ValueError(f"{path}: unknown value {value!r}; one of {', '.join(n[len(prefix):].lower() for n in names)}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry


def _checked_value(field: FieldDescriptor, value: Any, where: str) -> Any:
    """One value of a field (an item, for a repeated one): a nested message checked in turn, an enum name
    normalised; anything else as given (ParseDict checks its type)."""
    if field.message_type is not None:
        if isinstance(value, Message):
            return json_format.MessageToDict(value, preserving_proto_field_name=True)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a {field.message_type.name} (a dict or the message)")
        return _checked(field.message_type, value, where)
    if field.enum_type is not None and isinstance(value, str):
        return _enum_name(field.enum_type, value, where)
    return value


def _checked(descriptor: Descriptor, params: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`params` with every key checked against `descriptor`'s fields (an unknown one raises naming the allowed
    ones), enum names normalised and nested messages (dicts or messages) checked in turn."""
    checked = {}
    for key, value in params.items():
        field = descriptor.fields_by_name.get(key)
        where = f"{path}.{key}"
        if field is None:
            raise ValueError(f"{where}: unknown field; {descriptor.name} has {', '.join(descriptor.fields_by_name)}")
        if _is_map(field):
            checked[key] = value
        elif field.is_repeated:
            checked[key] = [_checked_value(field, item, where) for item in value]
        else:
            checked[key] = _checked_value(field, value, where)
    return checked


def strategy_message(strategy: str, value: Mapping[str, Any] | Message) -> Message:
    """The message of the GenerateRequest oneof field `strategy`, from the message itself or a dict of its fields.
    Raises ValueError naming an unknown strategy, field or value."""
    kind = STRATEGIES.get(strategy)
    if kind is None:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if isinstance(value, Message):
        if not isinstance(value, kind):
            raise ValueError(f"{strategy}: expected a {kind.__name__}, got a {type(value).__name__}")
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{strategy}: expected a {kind.__name__} or a dict of its fields")
    message = kind()
    try:
        json_format.ParseDict(_checked(kind.DESCRIPTOR, value, strategy), message)
    except json_format.ParseError as error:
        raise ValueError(f"{strategy}: {error}") from None
    return message


def parse_param(descriptor: Descriptor, assignment: str, into: dict[str, Any]) -> None:
    """One `key=value` (the CLI's --param) into `into`, typed by `descriptor`'s field: numbers, booleans
    (true/false/1/0/yes/no), enum names; a repeated field takes a JSON list or comma-separated items and collects
    over repeats; a map takes a JSON object or `key:value,...`; a message takes a JSON object, or its fields one
    at a time as dotted keys (`sampling.temperature=0.7`)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"{assignment!r}: expected key=value")
    head, _, rest = key.partition(".")
    field = descriptor.fields_by_name.get(head)
    if field is None:
        raise ValueError(f"{head}: unknown field; {descriptor.name} has {', '.join(descriptor.fields_by_name)}")
    repeated, is_map = field.is_repeated, _is_map(field)
    if rest:
        if field.message_type is None or repeated:
            raise ValueError(f"{key}: {head} is not a message; write {head}=VALUE")
        parse_param(field.message_type, f"{rest}={text}", into.setdefault(head, {}))
        return
    try:
        if is_map:
            value_field = field.message_type.fields_by_name["value"]
            if text.lstrip().startswith("{"):
                pairs = json.loads(text)
            else:
                items = [item.rsplit(":", 1) for item in text.split(",") if item]
                if any(len(item) != 2 for item in items):
                    raise ValueError(f"expected key:value,... or a JSON object, got {text!r}")
                pairs = dict(items)
            into.setdefault(head, {}).update({k: _scalar(value_field, v) for k, v in pairs.items()})
        elif field.message_type is not None and repeated:
            value = json.loads(text)
            into.setdefault(head, []).extend(value if isinstance(value, list) else [value])
        elif field.message_type is not None:
            into[head] = json.loads(text)
        elif repeated:
            items = json.loads(text) if text.lstrip().startswith("[") else [item for item in text.split(",") if item]
            into.setdefault(head, []).extend(_scalar(field, item) for item in items)
        else:
            into[head] = _scalar(field, text)
    except ValueError as error:  # json.JSONDecodeError included
        raise ValueError(f"{key}: {error}") from None


_INTEGERS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_FLOATS = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if not isinstance(value, str):  # from JSON: already typed
        return value
    if field.type in _INTEGERS:
        return int(value)
    if field.type in _FLOATS:
        return float(value)
    if field.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() not in _TRUE | _FALSE:
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in _TRUE
    return value


def _chat_message(message: pb.ChatMessage | Mapping[str, str] | Sequence[str]) -> pb.ChatMessage:
    if isinstance(message, pb.ChatMessage):
        return message
    if isinstance(message, Mapping):
        return pb.ChatMessage(role=message["role"], content=message["content"])
    role, content = message
    return pb.ChatMessage(role=role, content=content)


def generate_request(prompt: str | None = None, *, messages: Sequence[Any] | None = None, model: str = "",
                     max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                     top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
                     ignore_eos: bool = False, request_id: str = "",
                     **strategy: Mapping[str, Any] | Message) -> pb.GenerateRequest:
    """A GenerateRequest: exactly one of `prompt` (raw text) or `messages` (ChatMessage, {"role", "content"} or
    (role, content); rendered with the model's chat template); sampling fields left None take the server's
    defaults; at most one strategy keyword, as in the module docstring (none: plain sampling)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    unknown = [name for name in strategy if name not in STRATEGIES]
    if unknown:
        raise TypeError(f"unexpected argument {unknown[0]!r}: neither a request field nor a strategy "
                        f"({', '.join(STRATEGIES)})")
    if len(strategy) > 1:
        raise ValueError(f"one strategy a request; got {', '.join(strategy)}")
    sampling = pb.SamplingParams(stop=list(stop), ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    request = pb.GenerateRequest(model=model, sampling=sampling, request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.messages.extend(_chat_message(m) for m in messages)
    for name, value in strategy.items():
        getattr(request, name).CopyFrom(strategy_message(name, value))
    return request


class GenerateFields(TypedDict, total=False):
    """generate_request's keyword arguments, which Client.generate and generate_stream take: the sampling fields,
    the request's, and at most one strategy (its message, or a dict of the message's fields)."""
    messages: Sequence[pb.ChatMessage | Mapping[str, str] | tuple[str, str]]
    model: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool
    request_id: str
    contrastive: pb.ContrastiveDecoding | Mapping[str, Any]
    logit_fusion: pb.LogitFusion | Mapping[str, Any]
    entropy_switch: pb.EntropySwitch | Mapping[str, Any]
    refusal_steering: pb.RefusalSteering | Mapping[str, Any]
    best_of_n: pb.BestOfN | Mapping[str, Any]


class RerankFields(TypedDict, total=False):
    """rerank_request's keyword arguments, which Client.rerank takes."""
    model: str
    top_n: int
    mode: str | int | None
    window_size: int | None
    stride: int | None
    permutations: int | None
    aggregation: str | int | None
    max_passage_words: int | None
    seed: int | None
    request_id: str


def _rerank_enum(field: str, value: str | int | None) -> int:
    if not isinstance(value, str):
        return value or 0
    enum = pb.RerankRequest.DESCRIPTOR.fields_by_name[field].enum_type
    return enum.values_by_name[_enum_name(enum, value, field)].number


def rerank_request(query: str, passages: Sequence[str], *, model: str = "", top_n: int = 0,
                   mode: str | int | None = None, window_size: int | None = None, stride: int | None = None,
                   permutations: int | None = None, aggregation: str | int | None = None,
                   max_passage_words: int | None = None, seed: int | None = None,
                   request_id: str = "") -> pb.RerankRequest:
    """A RerankRequest; `mode` ("first_token", "generate") and `aggregation` ("kemeny", "borda") by name or
    number; fields left None take the server's defaults."""
    request = pb.RerankRequest(model=model, query=query, passages=list(passages), top_n=top_n,
                               mode=_rerank_enum("mode", mode), aggregation=_rerank_enum("aggregation", aggregation),
                               request_id=request_id)
    for name, value in (("window_size", window_size), ("stride", stride), ("permutations", permutations),
                        ("max_passage_words", max_passage_words), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    return request


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM data given as bytes, or the path of a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _service_config(retries: int, initial_backoff: float, max_backoff: float) -> str:
    policy = {"name": [{"service": SERVICE}, {"service": "grpc.health.v1.Health"}]}
    if retries:  # gRPC counts attempts, the first included, and takes at most 5
        policy["retryPolicy"] = {"maxAttempts": retries + 1, "initialBackoff": f"{initial_backoff}s",
                                 "maxBackoff": f"{max_backoff}s", "backoffMultiplier": 2,
                                 "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [policy]})


class Client:
    """An asyncio client of one Chorus server. Create and use it inside one event loop (gRPC's asyncio channels
    belong to the loop that first uses them); `close()` it, or use it as `async with`.

    address: host:port. tls: connect with TLS trusting the system's CAs; ca_certificate: trust this CA instead (PEM
    bytes or a file path; the server's own certificate when it is self-signed; implies TLS); client_certificate and
    client_key: for a server that asks for client certificates (frontend.tls.client_ca). token: the bearer token of
    a server with frontend.auth. timeout: the default deadline of a call in seconds (None: no deadline), over all
    its attempts. retries: how many times a call that ends UNAVAILABLE is sent again (0-4), after a random wait of
    up to initial_backoff seconds, doubling up to max_backoff. wait_for_ready: a call waits for the server to be
    reachable (until its deadline) instead of failing UNAVAILABLE at once. options: extra gRPC channel options.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, tls: bool = False,
                 ca_certificate: bytes | str | os.PathLike | None = None,
                 client_certificate: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, token: str | None = None,
                 timeout: float | None = 300.0, retries: int = 4, initial_backoff: float = 1.0,
                 max_backoff: float = 10.0, wait_for_ready: bool = False,
                 options: Sequence[tuple[str, Any]] = ()):
        if not 0 <= retries <= 4:
            raise ValueError(f"retries: 0 to 4 (gRPC makes at most 5 attempts), got {retries}")
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key go together")
        self.address, self.timeout, self.wait_for_ready = address, timeout, wait_for_ready
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [("grpc.service_config", _service_config(retries, initial_backoff, max_backoff)),
                         # gRPC retries only what it has buffered (256 KiB a call by default): room for a Rerank
                         # of many passages
                         ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
                         ("grpc.retry_buffer_size", 4 * RETRY_BUFFER_BYTES), *options]
        self._credentials = None
        if tls or ca_certificate is not None or client_certificate is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca_certificate), private_key=_pem(client_key),
                certificate_chain=_pem(client_certificate))
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> pb_grpc.DecodingStub:
        return pb_grpc.DecodingStub(self._connected())

    def _connected(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = (grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
                             if self._credentials is not None
                             else grpc.aio.insecure_channel(self.address, options=self._options))
        return self._channel

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return dict(timeout=self.timeout if timeout is _DEFAULT else timeout, metadata=self._metadata or None,
                    wait_for_ready=self.wait_for_ready)

    async def generate(self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = _DEFAULT,
                       **fields: Unpack[GenerateFields]) -> pb.GenerateResponse:
        """One whole response: the text, token ids, finish reason, usage, the seed used and the strategy's report.
        `prompt` may be a whole GenerateRequest (then nothing else but `timeout`); otherwise the arguments are
        generate_request's."""
        request = self._request(prompt, fields)
        try:
            return await self._stub().Generate(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise RequestError.of(error) from None

    async def generate_stream(self, prompt: str | pb.GenerateRequest | None = None, *,
                              timeout: float | None = _DEFAULT, **fields: Unpack[GenerateFields]
                              ) -> AsyncIterator[pb.GenerateResponse]:
        """The response as it is written: each message a text delta with its token ids (and, for best-of-N, progress
        messages first); the last carries finish_reason, usage, the seed and the report. Leaving the loop early
        cancels the request on the server."""
        request = self._request(prompt, fields)
        call = self._stub().GenerateStream(request, **self._call_options(timeout))
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise RequestError.of(error) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def rerank(self, query: str | pb.RerankRequest, passages: Sequence[str] = (), *,
                     timeout: float | None = _DEFAULT, **fields: Unpack[RerankFields]) -> pb.RerankResponse:
        """Passages ranked for the query (`ranking`: their indices, best first), with usage and windows. `query` may
        be a whole RerankRequest; otherwise the arguments are rerank_request's."""
        if isinstance(query, pb.RerankRequest):
            if passages or fields:
                raise ValueError("a RerankRequest goes alone")
            request = query
        else:
            request = rerank_request(query, passages, **fields)
        try:
            return await self._stub().Rerank(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise RequestError.of(error) from None

    async def list_models(self, *, timeout: float | None = _DEFAULT) -> pb.ListModelsResponse:
        """The server's models: roles, engine, context, the strategies each serves (and why not), load, replicas."""
        try:
            return await self._stub().ListModels(pb.ListModelsRequest(), **self._call_options(timeout))
        except grpc.RpcError as error:
            raise RequestError.of(error) from None

    async def health(self, service: str = "", *, timeout: float | None = _DEFAULT) -> str:
        """The server's gRPC health status ("SERVING", "NOT_SERVING", ...) for `service` ("" for the server,
        "chorus.v1.Decoding" for the API); it needs no token."""
        stub = health_pb2_grpc.HealthStub(self._connected())
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), **self._call_options(timeout))
        except grpc.RpcError as error:
            raise RequestError.of(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    @staticmethod
    def _request(prompt: str | pb.GenerateRequest | None, fields: GenerateFields) -> pb.GenerateRequest:
        if isinstance(prompt, pb.GenerateRequest):
            if fields:
                raise ValueError(f"a GenerateRequest goes alone; got {', '.join(fields)} too")
            return prompt
        return generate_request(prompt, **fields)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


class SyncClient:
    """The Client's calls, blocking, for code without an event loop: a Client runs on an event loop in a thread of
    its own. The arguments are Client's; `generate_stream` returns an iterator. `close()` it, or use `with`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chorus-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(address, options))

    @staticmethod
    async def _make(address: str, options: dict[str, Any]) -> Client:
        return Client(address, **options)

    def _run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C while waiting: the call is cancelled, not left running
            raise

    def generate(self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = _DEFAULT,
                 **fields: Unpack[GenerateFields]) -> pb.GenerateResponse:
        return self._run(self._client.generate(prompt, timeout=timeout, **fields))

    def generate_stream(self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = _DEFAULT,
                        **fields: Unpack[GenerateFields]) -> Iterator[pb.GenerateResponse]:
        stream = self._client.generate_stream(prompt, timeout=timeout, **fields)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def rerank(self, query: str | pb.RerankRequest, passages: Sequence[str] = (), *,
               timeout: float | None = _DEFAULT, **fields: Unpack[RerankFields]) -> pb.RerankResponse:
        return self._run(self._client.rerank(query, passages, timeout=timeout, **fields))

    def list_models(self, *, timeout: float | None = _DEFAULT) -> pb.ListModelsResponse:
        return self._run(self._client.list_models(timeout=timeout))

    def health(self, service: str = "", *, timeout: float | None = _DEFAULT) -> str:
        return self._run(self._client.health(service, timeout=timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
