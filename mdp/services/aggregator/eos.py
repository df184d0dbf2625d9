"""End-of-stream markers waiting until every tick of their symbol's run was folded (pure).

A bounded source (a replay) ends each symbol's run with a marker carrying the number of ticks
it sent. A tick batch retried after an outage can reach the stream after the marker; closing the
bars before it arrived would store them without it. So a marker waits here, per symbol, until the
run's contiguous prefix of folded sequences reaches its tick count.
"""

from __future__ import annotations

import msgspec

from mdp.services.aggregator.dedup import SeenSeqs
from mdp.shared.contract.messages import EndOfStream

__all__ = ["BadMarker", "EndOfStreamTracker"]


class BadMarker(ValueError):
    """An end-of-stream header that does not decode into an `EndOfStream`."""


class EndOfStreamTracker:
    """The end-of-stream markers (raw header JSON) waiting for late ticks, by symbol."""

    def __init__(self, waiting: dict[str, str] | None = None) -> None:
        self.waiting: dict[str, str] = dict(waiting) if waiting else {}

    def note(self, symbol: str, header: str | None) -> None:
        """Remember the marker a tick batch carried (None: it carried none)."""
        if header is not None:
            self.waiting[symbol] = header

    def take_complete(
        self, symbol: str, sources: dict[str, SeenSeqs]
    ) -> tuple[EndOfStream, str] | None:
        """The symbol's marker and raw header once its run is complete (then forgotten), else None.

        Raises BadMarker (and forgets the marker) when the header does not decode.
        """
        header = self.waiting.get(symbol)
        if header is None:
            return None
        try:
            marker = msgspec.json.decode(header, type=EndOfStream)
        except msgspec.DecodeError as exc:
            del self.waiting[symbol]
            raise BadMarker(str(exc)) from exc
        seen = sources.get(symbol)
        if seen is not None and seen.run == marker.run and seen.floor < marker.ticks:
            return None  # some ticks are still on their way
        del self.waiting[symbol]
        return marker, header
