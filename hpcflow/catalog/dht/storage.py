"""kademlia's ``IStorage`` for the DHT catalog: version-aware, merging, bounded.

kademlia's own :class:`~kademlia.storage.ForgetfulStorage` keeps the last value
stored under a key, from anyone, for a week.  Here every value is a list of
signed entries (:mod:`.values`), and storing one *merges* it with what is
held: per writer the larger stamp wins, so

* two holders of one name writing the name's index at once both stay in it,
* a late or replayed older value never replaces a newer one (the stamp
  decides, not the arrival order),
* a value that is not ours (not msgpack, a wrong key, a bad MAC with keys, a
  writer other than the one a pointer key names, an epoch a day ahead) is
  dropped and counted, never stored.

Entries expire ``expire_s`` after they were last stored (their writer
republishes them well before, see :mod:`.catalog`), so a dead holder's pointers
and old tombstones go away by themselves.  :meth:`iter_older_than` returns
nothing: kademlia's hourly republishing of *every* stored value by every
replica is replaced by each writer republishing its own.  At most
``max_keys`` keys are held (a flood of new keys is refused, counted).

Only the DHT thread touches an instance (kademlia calls it from its protocol).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgpack
from kademlia.storage import IStorage
from kademlia.utils import digest

from . import keys as K
from .values import Entry, decode_value, encode_value, merge

#: Entries not stored again for this long are dropped (3 x the default republish period).
DEFAULT_EXPIRE_S = 1800.0
DEFAULT_MAX_KEYS = 20_000


class PointerStorage(IStorage):
    def __init__(self, secret: bytes | None = None, *, expire_s: float = DEFAULT_EXPIRE_S,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.secret = secret
        self.expire_s = expire_s
        self.max_keys = max_keys
        #: digest -> (key, {writer: (stored at, entry)})
        self.data: dict[bytes, tuple[str, dict[str, tuple[float, Entry]]]] = {}
        self.stats = {"stored": 0, "refused": 0, "stale": 0, "full": 0}

    def __setitem__(self, dkey: Any, value: Any) -> None:
        if not isinstance(dkey, bytes) or len(dkey) != 20 or not isinstance(value, bytes):
            self.stats["refused"] += 1
            return
        held = self.data.get(dkey)
        key = held[0] if held else self._key_for(dkey, value)
        if key is None:
            self.stats["refused"] += 1
            return
        writer_only = K.single_writer(key)
        entries = merge(decode_value(value, self.secret, key), writer_only)
        if not entries:  # nothing valid, or only writers the key does not name
            self.stats["refused"] += 1
            return
        if held is None:
            if len(self.data) >= self.max_keys:
                self._cull()  # only when full: a scan of every key per new key is quadratic
            if len(self.data) >= self.max_keys:
                self.stats["full"] += 1
                return
            held = (key, {})
            self.data[dkey] = held
        now = time.monotonic()
        current = held[1]
        for e in entries:
            cur = current.get(e.writer)
            if cur is None or e.stamp > cur[1].stamp:
                current[e.writer] = (now, e)
                self.stats["stored"] += 1
            elif e.stamp == cur[1].stamp:
                current[e.writer] = (now, cur[1])  # the same entry again: keep it longer
            else:
                self.stats["stale"] += 1
        kept = {e.writer for e in merge([c[1] for c in current.values()], writer_only)}
        for w in [w for w in current if w not in kept]:
            del current[w]

    def _key_for(self, dkey: bytes, value: bytes) -> str | None:
        """The key a value's first entry was written for, if it hashes to ``dkey``
        (every entry is then checked against it by :func:`.values.decode_value`)."""
        try:
            items = msgpack.unpackb(value, raw=False, max_array_len=256, max_bin_len=8192,
                                    max_str_len=8192, max_map_len=0)
            first = msgpack.unpackb(items[0], raw=False, max_array_len=4096,
                                    max_bin_len=8192, max_str_len=8192, max_map_len=4096)
            key = first[1]
        except Exception:  # garbage from the network: any failure means "not ours"
            return None
        if isinstance(key, str) and K.kind_of(key) and digest(key) == dkey:
            return key
        return None

    def _entries(self, dkey: Any) -> list[Entry] | None:
        if not isinstance(dkey, bytes):
            return None
        held = self.data.get(dkey)
        if held is None:
            return None
        limit = time.monotonic() - self.expire_s
        current = held[1]
        for w in [w for w, (t, _) in current.items() if t < limit]:
            del current[w]
        if not current:
            del self.data[dkey]
            return None
        return [e for _, e in current.values()]

    def get(self, key: Any, default: Any = None) -> Any:
        entries = self._entries(key)
        return default if entries is None else encode_value(entries)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        return []  # writers republish their own entries (module docstring)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self._cull()
        return iter([(k, encode_value([e for _, e in held[1].values()]))
                     for k, held in list(self.data.items())])

    def _cull(self) -> None:
        for dkey in list(self.data):
            self._entries(dkey)

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:
        return True  # kademlia's Server takes ``storage or ForgetfulStorage()``
