"""Small helpers shared by the strategies' protobuf conversions and the service."""

from __future__ import annotations

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument


def optionals(proto, names: tuple[str, ...]) -> dict:
    """The set optional fields of `proto` among `names`; unset ones keep the dataclass default."""
    return {n: getattr(proto, n) for n in names if proto.HasField(n)}


def chat_messages(messages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages)


def enum_choice(choices: dict, value: int, field: str):
    """What an enum field's number means; INVALID_ARGUMENT for a number the API does not declare (a client built
    from a newer .proto, or a raw wire value)."""
    if value not in choices:
        raise InvalidArgument(field, f"{value} is not a value of this enum (declared: {sorted(choices)})")
    return choices[value]
