"""Per-peer traffic counters: what the replay harness and benchmarks read."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

#: Distinct peers counted by name; the rest are added up under OTHER.  The names come
#: from the wire (a bulk request's ``by``), so without a cap a client could grow the
#: counters without bound.
MAX_PEERS = 1024
OTHER = "(other)"


def _count(counters: defaultdict[str, int], peer: str, nbytes: int) -> None:
    if peer not in counters and len(counters) >= MAX_PEERS:
        peer = OTHER
    counters[peer] += nbytes


@dataclass
class Traffic:
    """Bytes and messages this process moved, keyed by the peer on the other side."""

    bytes_sent: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_received: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages_sent: int = 0
    messages_received: int = 0
    chunk_retries: int = 0
    #: Bulk sockets opened (a pull reuses an idle one to the same endpoint).
    bulk_sockets: int = 0
    #: Receive bandwidth (bytes/s) observed per peer, smoothed over transfers.
    bandwidth: dict[str, float] = field(default_factory=dict)

    def observe(self, peer: str, nbytes: int, seconds: float) -> None:
        """Learn a link's speed from a finished transfer (only big ones say anything)."""
        if nbytes < 1 << 20 or seconds <= 0:
            return
        rate = nbytes / seconds
        old = self.bandwidth.get(peer)
        self.bandwidth[peer] = rate if old is None else 0.7 * old + 0.3 * rate

    def sent(self, peer: str, nbytes: int) -> None:
        _count(self.bytes_sent, peer, nbytes)
        self.messages_sent += 1

    def received(self, peer: str, nbytes: int) -> None:
        _count(self.bytes_received, peer, nbytes)
        self.messages_received += 1

    def add(self, other: Traffic) -> None:
        """Count ``other``'s bytes and messages here too (a transfer counted apart, e.g. in
        another thread, joining the totals)."""
        for peer, n in other.bytes_sent.items():
            _count(self.bytes_sent, peer, n)
        for peer, n in other.bytes_received.items():
            _count(self.bytes_received, peer, n)
        self.messages_sent += other.messages_sent
        self.messages_received += other.messages_received
        self.chunk_retries += other.chunk_retries
        self.bulk_sockets += other.bulk_sockets

    def to_wire(self) -> dict[str, Any]:
        return {
            "bytes_sent": dict(self.bytes_sent),
            "bytes_received": dict(self.bytes_received),
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "chunk_retries": self.chunk_retries,
            "bulk_sockets": self.bulk_sockets,
            "bandwidth": {k: round(v) for k, v in self.bandwidth.items()},
        }
