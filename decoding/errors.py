"""Errors raised by request validation; the server maps them to gRPC status codes at one boundary."""


class InvalidArgument(ValueError):
    """A request field is out of range or malformed. `field` names it (dotted path, as in the .proto)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
