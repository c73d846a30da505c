"""The values the DHT catalog stores: lists of signed, versioned entries.

A value is a msgpack list of **entries**; an entry is the msgpack list
``[1, key, writer, [epoch, seq], body, mac]``:

* ``key`` -- the DHT key it was written for (a storing node checks that the key
  hashes to the digest it was sent under, so an entry cannot be replayed under
  another key);
* ``writer`` -- the node that wrote it; the **stamp** ``[epoch, seq]`` is that
  writer's run (its epoch, which grows across restarts, ``daemon/epoch.py``) and
  its own counter, so the writer's later entries always win over its earlier ones
  (no older value can overwrite a newer one, whatever order stores arrive in:
  kademlia issue #107);
* ``mac`` -- with ``--keys``, an HMAC-SHA256 (16 bytes) under a key derived from
  the cluster's node secret key, which every node has and no client has: a value
  without a valid one is dropped by storing nodes and by readers.  Without keys it
  is empty (anyone who can reach the UDP port can write, as anyone who can reach
  the other ports can).

Replicas merge values entry by entry: per writer, the larger stamp wins.  A
pointer or inventory key has a single writer (:func:`.keys.single_writer`),
so its value has one entry; an index has one entry per holder.  A **tombstone**
is an entry whose body says the writer holds nothing (a deleted part's pointer,
a holder's index entry with no parts): it wins over the writer's older entries
like any other, and expires like them when nobody republishes it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgpack

from ...errors import ProtocolError
from ..membership import MAX_EPOCH_AHEAD_S, epoch_ahead_s
from ..record import DatasetRecord

VERSION = 1
#: At most this many entries (writers) in one value: an index lists at most this many
#: holders of one name (beyond, the oldest entries are dropped by storing nodes).
MAX_ENTRIES = 32
MAC_BYTES = 16
Stamp = tuple[int, int]


def mac_key(node_secret: bytes | None) -> bytes | None:
    """The HMAC key for DHT values, derived from the cluster's node secret key."""
    if node_secret is None:
        return None
    return hashlib.sha256(b"hpcflow-dht-v1\0" + node_secret).digest()


@dataclass(frozen=True)
class Entry:
    key: str
    writer: str
    stamp: Stamp
    body: Any
    raw: bytes = b""

    @property
    def tombstone(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("deleted"))


def _signed_part(key: str, writer: str, stamp: Stamp, body: Any) -> bytes:
    return msgpack.packb([VERSION, key, writer, list(stamp), body], use_bin_type=True)


def make_entry(key: str, writer: str, stamp: Stamp, body: Any, secret: bytes | None) -> Entry:
    signed = _signed_part(key, writer, stamp, body)
    mac = hmac.new(secret, signed, hashlib.sha256).digest()[:MAC_BYTES] if secret else b""
    raw = msgpack.packb([VERSION, key, writer, list(stamp), body, mac], use_bin_type=True)
    return Entry(key, writer, stamp, body, raw)


def decode_entry(raw: object, secret: bytes | None) -> Entry:
    """Validate one entry (types, MAC, epoch not far in the future); ProtocolError if not."""
    if not isinstance(raw, bytes):
        raise ProtocolError("DHT entry must be bytes")
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=8192,
                            max_str_len=8192, max_array_len=4096, max_map_len=4096)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise ProtocolError(f"DHT entry is not msgpack: {exc}") from None
    if not (isinstance(d, list) and len(d) == 6 and d[0] == VERSION):
        raise ProtocolError("DHT entry is not [version, key, writer, stamp, body, mac]")
    _, key, writer, stamp, body, mac = d
    if not (isinstance(key, str) and isinstance(writer, str) and 0 < len(writer) <= 128
            and isinstance(stamp, list) and len(stamp) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 63
                    for x in stamp) and isinstance(mac, bytes)):
        raise ProtocolError("DHT entry has a malformed key, writer, stamp or mac")
    if secret is not None:
        want = hmac.new(secret, _signed_part(key, writer, (stamp[0], stamp[1]), body),
                        hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(want, mac):
            raise ProtocolError("DHT entry has no valid MAC for this cluster's keys")
    if epoch_ahead_s(stamp[0]) > MAX_EPOCH_AHEAD_S:
        raise ProtocolError("DHT entry's epoch is more than a day ahead of this clock")
    return Entry(key, writer, (stamp[0], stamp[1]), body, raw)


def encode_value(entries: list[Entry]) -> bytes:
    return msgpack.packb([e.raw for e in entries], use_bin_type=True)


def decode_value(raw: object, secret: bytes | None, key: str) -> list[Entry]:
    """The valid entries of a stored value for ``key`` (invalid ones are skipped)."""
    if not isinstance(raw, bytes):
        return []
    try:
        items = msgpack.unpackb(raw, raw=False, max_array_len=MAX_ENTRIES * 4,
                                max_bin_len=8192, max_str_len=8192)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):
        return []
    if not isinstance(items, list):
        return []
    out = []
    for item in items[:MAX_ENTRIES * 4]:
        try:
            e = decode_entry(item, secret)
        except ProtocolError:
            continue
        if e.key == key:
            out.append(e)
    return out


def merge(entries: list[Entry], single_writer: str | None = None) -> list[Entry]:
    """Per writer, the entry with the largest stamp (ties: the one seen first); only
    ``single_writer``'s when given; at most :data:`MAX_ENTRIES`, newest first."""
    best: dict[str, Entry] = {}
    for e in entries:
        if single_writer is not None and e.writer != single_writer:
            continue
        cur = best.get(e.writer)
        if cur is None or e.stamp > cur.stamp:
            best[e.writer] = e
    kept = sorted(best.values(), key=lambda e: (e.tombstone, -e.stamp[0], -e.stamp[1]))
    return kept[:MAX_ENTRIES]


# -- what the bodies hold -------------------------------------------------------------
#: A pointer's lineage is left out when the pointer would not fit in one value (the
#: record's other fields always do); ``slice_of`` and ``rows`` are kept (workflows read
#: slices by them) and ``lineage_trimmed`` says so.
POINTER_BUDGET = 6000


def pointer_body(rec: DatasetRecord) -> dict[str, Any]:
    body = rec.to_wire()
    if len(msgpack.packb(body, use_bin_type=True)) > POINTER_BUDGET:
        kept = {k: rec.lineage[k] for k in ("slice_of", "rows", "flow")
                if k in rec.lineage and len(repr(rec.lineage[k])) < 512}
        body["lineage"] = {**kept, "lineage_trimmed": True}
    return body


def record_of(entry: Entry, holder: str) -> DatasetRecord | None:
    """The record a pointer entry holds (None for a tombstone); ProtocolError when the
    body is not a valid record of ``holder``."""
    if entry.tombstone:
        return None
    rec = DatasetRecord.from_wire(entry.body)
    if rec.owner != holder:
        raise ProtocolError(f"pointer of {holder} names {rec.owner[:64]} as the owner")
    return rec


def index_body(parts: list[int | None]) -> dict[str, Any]:
    """A holder's index entry: the parts it holds (``None``: the unpartitioned whole),
    as runs ``[lo, hi)``; no parts at all is a tombstone."""
    whole = None in parts
    nums = sorted(p for p in parts if p is not None)
    runs: list[list[int]] = []
    for p in nums:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    if not whole and not runs:
        return {"deleted": True}
    return {"whole": whole, "runs": runs}


def parts_of(entry: Entry, limit: int = 100_000) -> list[int | None]:
    """The parts an index entry lists (at most ``limit``); ProtocolError if malformed."""
    body = entry.body
    if entry.tombstone:
        return []
    if not isinstance(body, dict) or not isinstance(body.get("runs", []), list):
        raise ProtocolError("malformed index entry")
    out: list[int | None] = [None] if body.get("whole") is True else []
    for run in body.get("runs", []):
        if not (isinstance(run, list) and len(run) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in run)
                and 0 <= run[0] < run[1] <= limit):
            raise ProtocolError("malformed run in an index entry")
        out.extend(range(run[0], min(run[1], run[0] + limit - len(out))))
        if len(out) >= limit:
            break
    return out
