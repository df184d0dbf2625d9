"""Which ticks of a provider run were already folded, by their per-symbol `seq` (pure).

A provider that resumes after a crash, or a publish retried after an outage, can deliver some
ticks twice and occasionally out of order. A high-water mark alone would drop a tick that
arrives after a later one; this keeps the contiguous prefix plus the few sequences above it.
"""

from __future__ import annotations

import msgspec

from mdp.shared.contract.messages import Tick


class SeenSeqs(msgspec.Struct):
    """Sequences folded for one (symbol, run): all of 1..`floor`, plus those in `above`."""

    run: str
    floor: int = 0
    above: list[int] = []

    def note(self, seqs: list[int]) -> None:
        """Record sequences as delivered without ticks (the router rejected those ticks)."""
        above = set(self.above) | {seq for seq in seqs if seq > self.floor}
        floor = self.floor
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        self.floor = floor
        self.above = sorted(above)

    def fresh(self, ticks: list[Tick]) -> tuple[list[Tick], int]:
        """Return the ticks not seen before (recording them) and how many were duplicates."""
        above = set(self.above)
        out: list[Tick] = []
        floor = self.floor
        for tick in ticks:
            seq = tick.seq
            if seq <= floor or seq in above:
                continue
            out.append(tick)
            if seq == floor + 1:
                floor = seq
                while floor + 1 in above:
                    floor += 1
                    above.discard(floor)
            else:
                above.add(seq)
        self.floor = floor
        self.above = sorted(above)
        return out, len(ticks) - len(out)


def fresh_ticks(
    sources: dict[str, SeenSeqs],
    symbol: str,
    run: str,
    ticks: list[Tick],
    rejected: list[int] | None = None,
) -> tuple[list[Tick], int]:
    """The ticks of `symbol`'s `run` not folded before, and how many were duplicates.

    Without a run (a source that does not number its runs) every tick is fresh; a new run of
    the symbol starts its record afresh. `rejected` seqs count as delivered.
    """
    if not run:
        return ticks, 0
    seen = sources.get(symbol)
    if seen is None or seen.run != run:
        seen = sources[symbol] = SeenSeqs(run)
    if rejected:
        seen.note(rejected)
    return seen.fresh(ticks)
