"""The synthetic adapter under another provider name: a second, independent live source."""

from __future__ import annotations

from typing import ClassVar

from mdp.services.provider.adapters.synthetic import SyntheticAdapter


class BackupAdapter(SyntheticAdapter):
    """Synthetic ticks published as provider `backup` (loaded as module:Class)."""

    name: ClassVar[str] = "backup"
