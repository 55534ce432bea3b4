"""The front end's transport security: TLS (optionally mutual), bearer-token authentication, and the rule that a
non-loopback address is never served in the clear without saying so.

- TLS: grpc's own `ssl_server_credentials` from PEM files (`frontend.tls.certificate`/`key`), with
  `client_ca` set clients must present a certificate it signed (mTLS). `self_signed: true` makes a certificate once
  into the cache (`self_signed_certificate`, with the `cryptography` package) for local use.
- Tokens: clients send the metadata `authorization: Bearer <token>`; `BearerTokenInterceptor` (a grpc.aio server
  interceptor) answers UNAUTHENTICATED before any handler runs when it is missing or unknown. Tokens come from a file
  (one a line, read again when the file changes: a rotated Kubernetes Secret takes effect without a restart) or an
  environment variable on the front end's node, never from the deploy file. Services in `open_services` (by default
  health and reflection, for Kubernetes probes and grpcurl) need no token.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hmac
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable

import grpc

from chorus.client import REQUEST_ID_METADATA
from server.config import AuthSpec, FrontendSpec, TLSSpec, is_loopback
from server.errors import ConfigError

log = logging.getLogger("ray.serve.chorus")

BEARER = "bearer "
# How often a tokens file is checked for a change (a stat), at most.
TOKENS_FILE_CHECK_S = 1.0
# A self-signed certificate is made again when it expires within this long.
RENEW_BEFORE = datetime.timedelta(days=7)
SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)


def warn_about_exposure(frontend: FrontendSpec, host: str) -> None:
    if is_loopback(host) or frontend.tls is not None:
        return
    if frontend.auth is not None:
        log.warning("frontend.host %s is reachable from other machines without TLS: bearer tokens travel in the "
                    "clear (terminate TLS in front of it, or configure frontend.tls)", host)
    else:
        log.warning("frontend.host %s is reachable from other machines with neither TLS nor tokens "
                    "(frontend.insecure: true)", host)


# ---- TLS ------------------------------------------------------------------------------------------------------------

def self_signed_dir() -> Path:
    from server.models import cache_dir
    return cache_dir() / "tls"


def _certificate_names() -> tuple[list[str], list[str]]:
    """What a local self-signed certificate is valid for: localhost, this machine's name, and the loopback
    addresses."""
    return sorted({"localhost", socket.gethostname()}), ["127.0.0.1", "::1"]


def _needs_renewal(cert_path: Path, names: list[str], addresses: list[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return True
    has = set(alt.get_values_for_type(x509.DNSName)) | {str(a) for a in alt.get_values_for_type(x509.IPAddress)}
    expires = cert.not_valid_after_utc
    return not set(names + addresses) <= has or expires - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE


def self_signed_certificate(directory: Path | None = None) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for this machine (localhost, its host name, 127.0.0.1,
    ::1), made once into `directory` (default: the cache's tls/) and made again only when it is about to expire.
    Safe to call from several processes at once (a file lock)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = directory or self_signed_dir()
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "self-signed.crt", directory / "self-signed.key"
    names, addresses = _certificate_names()
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _needs_renewal(cert_path, names, addresses) and key_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chorus self-signed")])
        now = datetime.datetime.now(datetime.UTC)
        alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + SELF_SIGNED_VALIDITY)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        _write_private(key_path, key_bytes)
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def tls_files(tls: TLSSpec) -> tuple[Path, Path]:
    """(certificate, key) the front end serves: the configured files, or the self-signed pair."""
    if tls.self_signed:
        return self_signed_certificate()
    return Path(tls.certificate), Path(tls.key)


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"frontend.tls.{what}: cannot read {path}: {error.strerror or error}") from None


def server_credentials(tls: TLSSpec) -> grpc.ServerCredentials:
    cert_path, key_path = tls_files(tls)
    client_ca = _read(tls.client_ca, "client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials([(_read(key_path, "key"), _read(cert_path, "certificate"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


# ---- tokens ---------------------------------------------------------------------------------------------------------

def parse_tokens(text: str, where: str) -> frozenset[bytes]:
    """Tokens from a file's text (one a line; blank lines and `#` comments skipped) or an environment variable's
    value (comma- or newline-separated)."""
    tokens = set()
    for line in text.replace(",", "\n").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            if any(c.isspace() for c in token):
                raise ConfigError(f"{where}: a token must not contain spaces")
            tokens.add(token.encode())
    if not tokens:
        raise ConfigError(f"{where}: no token in it")
    return frozenset(tokens)


class TokenStore:
    """The accepted tokens: from `auth.tokens_file` (read again when its modification time or size changes) or
    `auth.tokens_env`. A file that becomes unreadable or empty keeps the last good tokens and logs why."""

    def __init__(self, auth: AuthSpec, clock=time.monotonic):
        self._auth, self._clock = auth, clock
        self._checked = 0.0
        self._stamp: tuple[int, int] | None = None
        if auth.tokens_env:
            value = os.environ.get(auth.tokens_env)
            if value is None:
                raise ConfigError(f"frontend.auth.tokens_env: the environment variable {auth.tokens_env} is not set "
                                  "on this node (set it where `ray start` or `chorus serve` runs)")
            self._tokens = parse_tokens(value, f"frontend.auth.tokens_env ({auth.tokens_env})")
        else:
            self._tokens = self._read_file(strict=True)

    def _read_file(self, strict: bool) -> frozenset[bytes]:
        where = f"frontend.auth.tokens_file ({self._auth.tokens_file})"
        try:
            stat = os.stat(self._auth.tokens_file)
            tokens = parse_tokens(Path(self._auth.tokens_file).read_text(), where)
        except (OSError, ConfigError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            if strict:
                raise ConfigError(f"{where}: {reason}") from None
            log.error("%s: %s; keeping the %d tokens read before", where, reason, len(self._tokens))
            return self._tokens
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return tokens

    def tokens(self) -> frozenset[bytes]:
        if self._auth.tokens_file and self._clock() - self._checked >= TOKENS_FILE_CHECK_S:
            self._checked = self._clock()
            try:
                stat = os.stat(self._auth.tokens_file)
                changed = (stat.st_mtime_ns, stat.st_size) != self._stamp
            except OSError:
                changed = True
            if changed:
                self._tokens = self._read_file(strict=False)
        return self._tokens

    def accepts(self, token: bytes) -> bool:
        # Compared in constant time against every token, so the time taken says nothing about how close a guess was.
        return any([hmac.compare_digest(token, known) for known in self.tokens()])


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the `authorization: Bearer <token>` metadata, None when there is none."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip().encode()
    return None


MISSING_TOKEN = "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'"
WRONG_TOKEN = "the bearer token is not one this server accepts"


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without running it."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (a generator: abort raises before it)

    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **codecs)
    return grpc.unary_unary_rpc_method_handler(unary, **codecs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without an accepted bearer token, except to the services in `open_services`."""

    def __init__(self, store: TokenStore, open_services: Iterable[str]):
        self._store = store
        self._open = frozenset(open_services)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in self._open:
            return handler
        token = bearer_token(details.invocation_metadata)
        if token is not None and self._store.accepts(token):
            return handler
        message = MISSING_TOKEN if token is None else WRONG_TOKEN
        request_id = next((v for k, v in details.invocation_metadata or () if k == REQUEST_ID_METADATA), "-")
        log.warning("call %s refused: UNAUTHENTICATED (%s) request_id=%s", details.method,
                    "no bearer token" if token is None else "a token it does not accept", request_id)
        return _refusal(handler, message)
