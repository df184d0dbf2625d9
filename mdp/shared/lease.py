"""Leases in a KV bucket: one holder per key at a time, taken over only once expired."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from structlog.typing import FilteringBoundLogger

from mdp.shared.contract.records import LeaseRecord


class LeaseLost(Exception):
    """Another holder took the lease (or it could not be renewed in time)."""


def may_take(record: LeaseRecord | None, owner: str, now_ns: int) -> bool:
    """Whether `owner` may take a lease in this state (pure)."""
    return record is None or record.owner == owner or record.expires_ns <= now_ns


@dataclass
class Lease:
    """A lease on `key`: `acquire` waits as a standby until it is free, `renew` keeps it."""

    kv: KeyValue
    key: str
    owner: str
    ttl_s: float = 5.0
    log: FilteringBoundLogger | None = None
    revision: int = field(default=0, init=False)

    def _value(self) -> bytes:
        return msgspec.json.encode(LeaseRecord(self.owner, time.time_ns() + int(self.ttl_s * 1e9)))

    async def acquire(self, stopping: asyncio.Event | None = None) -> bool:
        """Take the lease, waiting while another live holder has it; False if told to stop."""
        announced = False
        while stopping is None or not stopping.is_set():
            try:
                entry = await self.kv.get(self.key)
                record = msgspec.json.decode(entry.value or b"null", type=LeaseRecord | None)
                revision = entry.revision
            except KeyNotFoundError:
                record, revision = None, None
            if may_take(record, self.owner, time.time_ns()):
                try:
                    if revision is None:
                        self.revision = await self.kv.create(self.key, self._value())
                    else:
                        self.revision = await self.kv.update(self.key, self._value(), last=revision)
                    return True
                except KeyWrongLastSequenceError:
                    continue  # somebody moved first: look again
                except Exception as exc:  # e.g. create() on a key that reappeared
                    if self.log is not None:
                        self.log.debug("lease_race", key=self.key, error=repr(exc))
            elif not announced and self.log is not None:
                self.log.info("lease_standby", key=self.key, holder=record.owner if record else "")
                announced = True
            await asyncio.sleep(min(1.0, self.ttl_s / 3))
        return False

    async def renew(self) -> None:
        """Extend the lease; raise LeaseLost if someone else holds it now."""
        try:
            self.revision = await self.kv.update(self.key, self._value(), last=self.revision)
        except KeyWrongLastSequenceError as exc:
            raise LeaseLost(f"lease {self.key} was taken over") from exc

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled; raise LeaseLost when it is gone.

        A renewal that fails for a passing reason (an outage, a leader election) is retried.
        If another instance took the lease meanwhile, the next renewal says so; and anything
        this holder writes with compare-and-swap in between is refused, so nothing is doubled.
        """
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew()
            except LeaseLost:
                raise
            except Exception as exc:
                if self.log is not None:
                    self.log.warning("lease_renew_failed", key=self.key, error=repr(exc))

    async def release(self) -> None:
        """Give the lease up so a standby can take it at once."""
        try:
            await self.kv.delete(self.key, last=self.revision)
        except Exception as exc:  # already taken or gone: nothing to release
            if self.log is not None:
                self.log.debug("lease_release_skipped", key=self.key, error=repr(exc))
