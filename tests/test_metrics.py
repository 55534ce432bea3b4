"""How server/metrics.py times tokens (TokenClock), with recording histograms in place of Ray's; what reaches
Prometheus through the real server: tests/integration/test_server.py."""

from __future__ import annotations

import pytest

from server import metrics


class Recorded:
    """A histogram that keeps what it is given."""

    def __init__(self):
        self.values: list[tuple[float, dict]] = []

    def observe(self, value: float, tags: dict) -> None:
        self.values.append((value, tags))


def test_the_first_chunk_is_the_time_to_first_token_and_later_chunks_share_their_gap(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    first, inter = Recorded(), Recorded()
    clock = metrics.TokenClock(first, inter, {"group": "g", "strategy": "plain"})
    now[0] = 100.5
    clock.tokens(0)  # a chunk without tokens (a progress message) times nothing
    clock.tokens(2)  # the first chunk: its arrival is the first token's, whatever else it carries
    now[0] = 100.8
    clock.tokens(1)
    now[0] = 101.4
    clock.tokens(3)  # three tokens 0.6 s after the one before: 0.2 s each
    assert first.values == [(0.5, {"group": "g", "strategy": "plain"})]
    assert [value for value, _ in inter.values] == pytest.approx([0.3, 0.2, 0.2, 0.2])
