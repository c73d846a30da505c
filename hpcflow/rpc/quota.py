"""Bytes a server holds for its clients at once, per connection and in total.

A request that would take either over its limit is refused at once with
:class:`~hpcflow.errors.Overloaded` (the client may retry later) before
anything is allocated; what was reserved is given back by the release
function :meth:`ByteQuota.reserve` returns (for a reply: once its bytes have
left the process, see :func:`~hpcflow.rpc.strict.after_reply`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import Overloaded


class ByteQuota:
    """``per_key`` bytes per key (a connection) and ``total`` bytes in all."""

    def __init__(self, what: str, per_key: int, total: int) -> None:
        self.what, self.per_key, self.total = what, per_key, total
        self.held: Counter[Hashable] = Counter()
        self.in_use = 0
        self.refused = 0

    def reserve(self, key: Hashable, nbytes: int) -> Callable[[], None]:
        """Hold ``nbytes`` for ``key``, or raise :class:`Overloaded`; returns the release
        (calling it again does nothing)."""
        mine = self.held[key]
        if mine + nbytes > self.per_key or self.in_use + nbytes > self.total:
            self.refused += 1
            raise Overloaded(
                f"{self.what}: {nbytes} more bytes would exceed the limits ({mine} held for "
                f"this connection of at most {self.per_key}, {self.in_use} in all of at most "
                f"{self.total}): retry later")
        self.held[key] += nbytes
        self.in_use += nbytes
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.held[key] -= nbytes
            self.in_use -= nbytes
            if self.held[key] <= 0:
                del self.held[key]

        return release

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.in_use, "holders": len(self.held), "refused": self.refused}


__all__ = ["ByteQuota"]
