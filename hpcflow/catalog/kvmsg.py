"""KVMsg: the one message type of the catalog stream (the ZeroMQ Guide's Clone pattern).

Each publisher numbers its own messages; ``(sender, epoch, seq)`` orders them.
``epoch`` is fixed per daemon run (nanosecond start time), so a restarted
publisher is recognised even though its sequence starts again.

Three kinds on the wire, two frames each (``[kind, msgpack body]``):

* ``KV`` — ``key`` set to ``value`` (a record map) or deleted (``value`` nil).
* ``HB`` — heartbeat: current ``seq`` (so a subscriber that missed the last
  update notices the gap), node load, and the gossiped membership.
* ``BYE`` — a clean shutdown: peers withdraw the sender's entries at once
  instead of waiting for the TTL.

``KV`` and ``BYE`` carry the sender's signature (``sig``, see :mod:`.signing`): they
are relayed by other nodes, and only the signature says who wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from ..wire import pack, unpack_map

KV = b"KV"
HB = b"HB"
BYE = b"BYE"
MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True)
class KVMsg:
    kind: bytes
    sender: str
    epoch: int
    seq: int
    key: str = ""
    value: dict[str, Any] | None = None
    props: dict[str, Any] = field(default_factory=dict)
    sig: bytes = b""

    def encode(self) -> list[bytes]:
        body = {"s": self.sender, "e": self.epoch, "q": self.seq, "k": self.key,
                "v": self.value, "p": self.props, "g": self.sig}
        return [self.kind, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> KVMsg:
        """Parse and type-check a message; anything odd is a :class:`ProtocolError`."""
        if len(frames) != 2:
            raise ProtocolError(f"catalog message has {len(frames)} frames, expected 2")
        kind, raw = bytes(frames[0]), frames[1]
        if kind not in (KV, HB, BYE):
            raise ProtocolError(f"unknown catalog message kind {kind[:16]!r}")
        b = unpack_map(raw, MAX_BODY, "catalog message")
        sender, epoch, seq = b.get("s"), b.get("e"), b.get("q")
        key, value, props = b.get("k", ""), b.get("v"), b.get("p") or {}
        if not isinstance(sender, str) or not sender or len(sender) > 128:
            raise ProtocolError("catalog message without a valid sender")
        for v in (epoch, seq):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProtocolError("catalog message epoch/seq must be non-negative ints")
        if not isinstance(key, str) or (value is not None and not isinstance(value, dict)):
            raise ProtocolError("catalog message key/value has the wrong type")
        if not isinstance(props, dict):
            raise ProtocolError("catalog message props must be a map")
        sig = b.get("g") or b""
        if not isinstance(sig, bytes) or len(sig) > 64:
            raise ProtocolError("catalog message signature must be at most 64 bytes")
        if kind == KV and not key:
            raise ProtocolError("KV message without a key")
        assert isinstance(epoch, int) and isinstance(seq, int)  # checked above
        return cls(kind, sender, epoch, seq, key, value, props, sig)
