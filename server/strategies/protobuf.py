"""Small helpers shared by the strategies' protobuf conversions and the service."""

from __future__ import annotations

from decoding.chat import ChatMessage


def optionals(proto, names: tuple[str, ...]) -> dict:
    """The set optional fields of `proto` among `names`; unset ones keep the dataclass default."""
    return {n: getattr(proto, n) for n in names if proto.HasField(n)}


def chat_messages(messages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages)
