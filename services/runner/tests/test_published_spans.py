"""Which run events are known to be in JetStream: spans, merged, never jumping over a hole."""

from __future__ import annotations

from flowmesh.runner.publisher import merged as _merged


def test_adjacent_and_overlapping_spans_are_joined_keeping_the_latest_time() -> None:
    assert _merged([(4, 6, 2.0), (1, 3, 1.0), (5, 8, 3.0)]) == [(1, 8, 3.0)]


def test_a_hole_keeps_spans_apart() -> None:
    # events 4 and 5 failed to publish: what follows them must not be recorded before them
    assert _merged([(6, 9, 2.0), (1, 3, 1.0)]) == [(1, 3, 1.0), (6, 9, 2.0)]
