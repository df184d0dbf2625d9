"""Per-symbol source selection: the first available provider in the configured order (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SourceSelector:
    """Chooses, per symbol, which provider's ticks become `md.quotes.<sym>`.

    A provider is available for a symbol while it has delivered ticks for it within
    `stale_after_ns`. Among available providers the one earliest in `order` wins; providers
    not named in `order` rank after those that are, alphabetically.
    """

    order: Sequence[str]
    stale_after_ns: int
    _last_seen: dict[str, dict[str, int]] = field(default_factory=dict)
    _chosen: dict[str, str] = field(default_factory=dict)

    def _rank(self, provider: str) -> tuple[int, str]:
        try:
            return (self.order.index(provider), "")
        except ValueError:
            return (len(self.order), provider)

    def observe(self, symbol: str, provider: str, now_ns: int) -> tuple[bool, str | None]:
        """Record ticks from `provider`; return (forward them?, the newly chosen source or None)."""
        seen = self._last_seen.setdefault(symbol, {})
        seen[provider] = now_ns
        current = self._chosen.get(symbol)
        if current == provider:
            return True, None
        healthy = current is not None and now_ns - seen[current] <= self.stale_after_ns
        if healthy and self._rank(provider) >= self._rank(current):  # type: ignore[arg-type]
            return False, None  # keep a healthy source unless a better-ranked one appears
        available = [p for p, t in seen.items() if now_ns - t <= self.stale_after_ns]
        best = min(available, key=self._rank)
        if best != current:
            self._chosen[symbol] = best
            return best == provider, best
        return best == provider, None

    def chosen(self, symbol: str) -> str | None:
        """The provider currently routed for `symbol`."""
        return self._chosen.get(symbol)
