"""The front end's security settings and parts (server/security.py): the deploy-file rules, tokens, the
self-signed certificate, and mutual TLS plus the token interceptor on a real grpc.aio server and client in-process
(the whole server over TLS with tokens: tests/integration/test_production_server.py)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server import security
from server.config import AuthSpec, TLSSpec, parse_chorus_config
from server.errors import ConfigError

MODELS = {"m": {"path": "embedded:smollm2-135m-instruct"}}
GROUPS = {"g": {"base": "m"}}


def frontend(**fields):
    return parse_chorus_config({"models": MODELS, "groups": GROUPS, "frontend": fields}).frontend


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.3", "::1", "localhost", "node-ip"])
def test_loopback_hosts_need_neither_tls_nor_tokens(host):
    assert frontend(host=host).tls is None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7", "::", "my-host"])
def test_another_host_needs_tls_or_tokens_or_insecure(host, tmp_path):
    with pytest.raises(ConfigError, match="frontend.insecure: true"):
        frontend(host=host)
    assert frontend(host=host, insecure=True).insecure
    assert frontend(host=host, auth={"tokens_env": "T"}).auth == AuthSpec(tokens_env="T")
    assert frontend(host=host, tls={"self_signed": True}).tls == TLSSpec(self_signed=True)


@pytest.mark.parametrize("tls, says", [
    ({"certificate": "/c.pem"}, "go together"),
    ({"certificate": "/c.pem", "key": "/k.pem", "self_signed": True}, "not both or neither"),
    ({}, "not both or neither"),
    ({"certificate": "c.pem", "key": "/k.pem"}, "tls.certificate: an absolute path"),
    ({"self_signed": True, "client_ca": "ca.pem"}, "tls.client_ca: an absolute path"),
    ({"self_signed": "yes"}, "true or false"),
    ({"self_signed": True, "cert": "/c"}, r"unknown key\(s\) \['cert'\]"),
])
def test_bad_tls_settings_are_refused_naming_the_field(tls, says):
    with pytest.raises(ConfigError, match=says):
        frontend(tls=tls)


@pytest.mark.parametrize("auth, says", [
    ({"tokens": ["abc"]}, "tokens never go in the deploy file"),
    ({}, "exactly one of"),
    ({"tokens_env": "T", "tokens_file": "/t"}, "exactly one of"),
    ({"tokens_file": "tokens.txt"}, "tokens_file: an absolute path"),
    ({"tokens_env": "NOT A NAME"}, "the name of an environment variable"),
    ({"tokens_env": "T", "open_services": "grpc.health.v1.Health"}, "list of fully qualified service names"),
])
def test_bad_auth_settings_are_refused_naming_the_field(auth, says):
    with pytest.raises(ConfigError, match=says):
        frontend(auth=auth)


@pytest.mark.parametrize("fields, says", [
    ({"health_port": 50051}, "must differ from frontend.port"),
    ({"health_port": 70000}, "health_port: a port number"),
    ({"port": "50051"}, "port: a port number"),
    ({"insecure": "yes"}, "insecure: true or false"),
])
def test_bad_ports_and_flags_are_refused(fields, says):
    with pytest.raises(ConfigError, match=says):
        frontend(**fields)


def test_open_services_default_to_health_and_reflection_and_can_be_closed():
    assert frontend(auth={"tokens_env": "T"}).auth.open_services == (health.SERVICE_NAME, reflection.SERVICE_NAME)
    assert frontend(auth={"tokens_env": "T", "open_services": []}).auth.open_services == ()


def test_tokens_from_a_file_skip_comments_and_are_read_again_when_it_changes(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("# the team's tokens\nalpha\n\n  beta  \n")
    now = [0.0]
    store = security.TokenStore(AuthSpec(tokens_file=str(path)), clock=lambda: now[0])
    assert store.tokens() == {b"alpha", b"beta"} and store.accepts(b"beta") and not store.accepts(b"gamma")
    path.write_text("gamma\n")
    assert store.accepts(b"beta"), "checked at most once a second"
    now[0] += security.TOKENS_FILE_CHECK_S
    assert store.accepts(b"gamma") and not store.accepts(b"beta")
    path.write_text("# emptied by mistake\n")
    now[0] += security.TOKENS_FILE_CHECK_S
    assert store.accepts(b"gamma"), "a file left without tokens keeps the last good ones"
    assert "keeping the 1 tokens read before" in caplog.text


def test_tokens_from_the_environment_and_what_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_TEST_TOKENS", "one, two")
    assert security.TokenStore(AuthSpec(tokens_env="CHORUS_TEST_TOKENS")).tokens() == {b"one", b"two"}
    monkeypatch.delenv("CHORUS_TEST_TOKENS")
    with pytest.raises(ConfigError, match="CHORUS_TEST_TOKENS is not set on this node"):
        security.TokenStore(AuthSpec(tokens_env="CHORUS_TEST_TOKENS"))
    (tmp_path / "empty").write_text("# none yet\n")
    with pytest.raises(ConfigError, match="no token in it"):
        security.TokenStore(AuthSpec(tokens_file=str(tmp_path / "empty")))
    (tmp_path / "spaced").write_text("two words\n")
    with pytest.raises(ConfigError, match="must not contain spaces"):
        security.TokenStore(AuthSpec(tokens_file=str(tmp_path / "spaced")))


def test_missing_tokens_file_is_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        security.TokenStore(AuthSpec(tokens_file=str(tmp_path / "absent")))


@pytest.mark.parametrize("metadata, token", [
    ((("authorization", "Bearer abc"),), b"abc"), ((("authorization", "bearer  abc "),), b"abc"),
    ((("x-other", "1"), ("authorization", "BEARER abc")), b"abc"), ((("authorization", "abc"),), None),
    ((("authorization", "Basic abc"),), None), ((), None), (None, None)])
def test_bearer_token_reads_the_authorization_metadata(metadata, token):
    assert security.bearer_token(metadata) == token


def test_the_self_signed_certificate_is_made_once_for_this_machine(tmp_path, monkeypatch):
    cert_path, key_path = security.self_signed_certificate(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost"} <= set(alt.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        alt.get_values_for_type(x509.IPAddress))
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    first = cert_path.read_bytes()
    assert security.self_signed_certificate(tmp_path) == (cert_path, key_path)
    assert cert_path.read_bytes() == first, "made once"
    monkeypatch.setattr(security, "RENEW_BEFORE", security.SELF_SIGNED_VALIDITY + datetime.timedelta(days=1))
    security.self_signed_certificate(tmp_path)
    assert cert_path.read_bytes() != first, "made again when it is about to expire"


# ---- mutual TLS and the interceptor on a real server ----------------------------------------------------------------

def _issue(subject: str, key, issuer=None, issuer_key=None, ca=False, ip: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(item) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it, and a stranger's."""
    folder = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "server", "client", "stranger")}
    ca = _issue("test ca", keys["ca"], ca=True)
    certs = {"ca": ca, "server": _issue("server", keys["server"], ca, keys["ca"], ip="127.0.0.1"),
             "client": _issue("client", keys["client"], ca, keys["ca"]),
             "stranger": _issue("stranger", keys["stranger"], ca=True)}
    for name in keys:
        (folder / f"{name}.crt").write_bytes(_pem(certs[name]))
        (folder / f"{name}.key").write_bytes(_pem(keys[name]))
    return folder


async def _serve_and_call(pki, tokens_file, calls):
    """A grpc.aio server with health and reflection, mutual TLS from TLSSpec and tokens with reflection closed;
    returns each call's status code."""
    tls = TLSSpec(certificate=str(pki / "server.crt"), key=str(pki / "server.key"), client_ca=str(pki / "ca.crt"))
    auth = AuthSpec(tokens_file=str(tokens_file), open_services=(health.SERVICE_NAME,))
    server = grpc.aio.server(interceptors=[security.BearerTokenInterceptor(security.TokenStore(auth),
                                                                           auth.open_services)])
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port("127.0.0.1:0", security.server_credentials(tls))
    await server.start()
    codes = {}
    try:
        for name, (client, metadata) in calls.items():
            credentials = grpc.ssl_channel_credentials(
                (pki / "ca.crt").read_bytes(), *([(pki / f"{client}.key").read_bytes(),
                                                  (pki / f"{client}.crt").read_bytes()] if client else []))
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata,
                        timeout=5)
                    async for _ in stream:
                        pass
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    codes[name] = error.code()
    finally:
        await server.stop(None)
    return codes


def test_mutual_tls_and_tokens_on_a_real_server(pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("good\n")
    bearer = (("authorization", "Bearer good"),)
    codes = asyncio.run(_serve_and_call(pki, tokens, {
        "client certificate and token": ("client", bearer),
        "client certificate, no token (a closed stream-stream service)": ("client", None),
        "client certificate, wrong token": ("client", (("authorization", "Bearer bad"),)),
        "no client certificate": (None, bearer),
        "a certificate the CA did not sign": ("stranger", bearer),
    }))
    assert codes == {
        "client certificate and token": grpc.StatusCode.OK,
        "client certificate, no token (a closed stream-stream service)": grpc.StatusCode.UNAUTHENTICATED,
        "client certificate, wrong token": grpc.StatusCode.UNAUTHENTICATED,
        "no client certificate": grpc.StatusCode.UNAVAILABLE,
        "a certificate the CA did not sign": grpc.StatusCode.UNAVAILABLE,
    }


def test_an_unreadable_certificate_is_a_config_error_naming_the_field(tmp_path):
    (tmp_path / "k").write_text("a key")
    with pytest.raises(ConfigError, match="frontend.tls.certificate: cannot read .*absent.crt: No such file"):
        security.server_credentials(TLSSpec(certificate=str(tmp_path / "absent.crt"), key=str(tmp_path / "k")))
