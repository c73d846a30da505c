"""msgpack at the network boundary: encode maps, decode untrusted bytes into a map or fail.

Both the catalog stream and the bulk channel carry msgpack maps from peers
we do not trust; anything undecodable, oversized or not a map becomes a
:class:`~hpcflow.errors.ProtocolError`, never a crash.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ProtocolError


def pack(d: dict[str, Any]) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


#: Items in one msgpack array or map a node decodes in an RPC event (the same bound as
#: ``rpc.strict.MAX_ITEMS``): a larger event is dropped unanswered.
MAX_ITEMS = 100_000


def unencodable(value: Any) -> str | None:
    """Why msgpack cannot encode ``value`` (a set, a numpy array or integer ...), or a
    node would not decode it (an array or map of more than :data:`MAX_ITEMS` items), or
    None.

    Checked where a caller's values enter the wire (op params, lineage), so the
    caller gets a typed error naming the value rather than msgpack's TypeError, or a
    call the node drops and the caller waits out."""
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        return str(exc)
    try:
        msgpack.unpackb(packed, raw=False, strict_map_key=False, max_array_len=MAX_ITEMS,
                        max_map_len=MAX_ITEMS)
    except ValueError:
        return f"it holds a list or dict of more than {MAX_ITEMS} items, more than a node " \
               "accepts in one message"
    return None


def unpack_map(raw: bytes, limit: int, what: str) -> dict[str, Any]:
    """Decode ``raw`` (at most ``limit`` bytes) into a map with string keys."""
    if len(raw) > limit:
        raise ProtocolError(f"{what} too large ({len(raw)} > {limit} bytes)")
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a map")
    return value
