"""Waiting for a Chorus server to report SERVING on the standard grpc.health.v1 service."""

from __future__ import annotations

import time
from typing import Callable


def wait_until_serving(address: str, timeout_s: float, failure: Callable[[], str | None],
                       credentials=None) -> str | None:
    """Polls Health/Check once a second until SERVING and returns None; returns why not otherwise: the text
    `failure()` gives as soon as it gives one (a process exited, a deployment failed), or a timeout message.
    `credentials` (grpc.ChannelCredentials): a TLS front end's; None: plaintext."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return None
            except grpc.RpcError:
                pass
            reason = failure()
            if reason:
                return reason
            time.sleep(1)
    return f"not SERVING after {timeout_s:.0f} s"
