"""A chat message, as requests carry them and chat templates render them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
