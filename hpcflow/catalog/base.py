"""The catalog interface: the cluster-wide answer to "who holds what".

Everything above the catalog (RPC handlers, the planner, the client) talks
to this interface only.  :class:`~hpcflow.catalog.replicated.ReplicatedCatalog`
implements it by full replication over PUB/SUB; a DHT-backed implementation
can replace it without touching callers.  All queries are answered from
local state, without network round trips.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DatasetConflict, DatasetNotFound, InvalidData
from .membership import PeerInfo
from .record import DatasetRecord, validate_name


@dataclass(frozen=True)
class PartLocation:
    """One row-part of a logical dataset and the live nodes holding a copy of it."""

    part: int | None
    row_start: int
    row_stop: int
    nbytes: int
    holders: tuple[DatasetRecord, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(r.owner for r in self.holders)


@dataclass(frozen=True)
class Location:
    """Where the parts of a logical dataset live; ``complete`` when no part is missing."""

    name: str
    parts: tuple[PartLocation, ...]
    missing: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def owners(self) -> set[str]:
        """The nodes holding any part."""
        return {r.owner for p in self.parts for r in p.holders}

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "nbytes": self.nbytes, "complete": self.complete, "missing": list(self.missing),
            "parts": [
                {"part": p.part, "row_start": p.row_start, "row_stop": p.row_stop,
                 "nbytes": p.nbytes, "holders": [r.to_wire() for r in p.holders]}
                for p in self.parts
            ],
        }


@dataclass(frozen=True)
class NodeView:
    """A member of the cluster as this node sees it."""

    info: PeerInfo
    alive: bool
    load: dict[str, Any] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**self.info.to_wire(), "alive": self.alive, "load": self.load, "ops": self.ops}


@dataclass(frozen=True)
class CatalogSnapshot:
    """An immutable picture of the catalog: input for planning, never updated in place."""

    self_name: str
    records: tuple[DatasetRecord, ...]
    nodes: tuple[NodeView, ...]
    #: Records of dead members too: which parts exist at all (see :func:`locate`).
    known: tuple[DatasetRecord, ...] = ()

    def locate(self, name: str) -> Location:
        return locate(name, self.records, self.known)


Records = tuple[DatasetRecord, ...] | list[DatasetRecord]


def locate(name: str, records: Records, known: Records = ()) -> Location:
    """Group live ``records`` of ``name`` into parts with row ranges (pure function).

    Which parts exist is decided from everything the catalog knows: the live
    records and ``known`` (which also holds dead members' records), so a part
    whose only holder died is reported missing even when no ``nparts`` was
    declared.  Parts that disagree on dtype or row shape raise
    :class:`InvalidData`: they cannot be read as one array.
    """
    validate_name(name)
    mine = [r for r in records if r.name == name]
    if not mine:
        raise DatasetNotFound(f"no live node holds a dataset named {name!r}")
    by_part: dict[int | None, list[DatasetRecord]] = {}
    for r in mine:
        by_part.setdefault(r.part, []).append(r)
    for holders in by_part.values():  # newest version first, then by owner for determinism
        holders.sort(key=lambda r: (-r.version, r.owner))
        check_no_conflict(holders)
    if None in by_part:
        whole = by_part[None]
        rec = whole[0]
        part = PartLocation(None, 0, rec.rows, rec.nbytes,
                            tuple(r for r in whole if r.checksum == rec.checksum))
        return Location(name, (part,), (), rec.shape, rec.dtype)
    indices = sorted(k for k in by_part if k is not None)
    everyone = mine + [r for r in known if r.name == name and r.part is not None]
    declared = max((r.nparts or 0) for r in everyone)  # both bounded by MAX_PARTS
    expected = max(declared, max(r.part or 0 for r in everyone) + 1)
    missing = tuple(i for i in range(expected) if i not in by_part)
    check_parts_agree(name, [by_part[i][0] for i in indices])
    parts, row = [], 0
    for i in indices:
        rec = by_part[i][0]
        same = tuple(r for r in by_part[i] if r.checksum == rec.checksum)
        parts.append(PartLocation(i, row, row + rec.rows, rec.nbytes, same))
        row += rec.rows
    first = by_part[indices[0]][0]
    shape = (row, *first.shape[1:]) if first.shape else (row,)
    return Location(name, tuple(parts), missing, shape, first.dtype)


def check_no_conflict(holders: list[DatasetRecord]) -> None:
    """Holders of one part, newest first: every copy must be identical.

    Two nodes holding different bytes under one name were each acknowledged a
    put while they could not see each other (a partition, see
    ``daemon/claims.py``), or one of them is not a node that follows the put
    rules (it announced a name another node holds).  Neither is served in place
    of the other, whatever their versions say (a version is the holder's own
    count of its overwrites, not an order between nodes: a rogue's higher one
    used to shadow the real dataset everywhere): reads fail with
    :class:`DatasetConflict` until all but one of them are deleted.
    """
    top = holders[0]
    other = {r.owner for r in holders if r.checksum != top.checksum}
    if other:
        owners = sorted(other | {top.owner})
        raise DatasetConflict(f"{top.key} holds different data on {', '.join(owners)} (each "
                              "was acknowledged while they could not see each other, or one "
                              "of them announced a name the other held): delete all but one "
                              "of them")


def check_parts_agree(name: str, parts: list[DatasetRecord]) -> None:
    """Every row-part of one dataset must have the same dtype and row shape."""
    if not parts:
        return
    ref = parts[0]
    for r in parts[1:]:
        if r.dtype != ref.dtype or r.shape[1:] != ref.shape[1:]:
            raise InvalidData(
                f"the parts of {name} disagree: part {ref.part} on {ref.owner} has rows of "
                f"{list(ref.shape[1:])} {ref.dtype}, part {r.part} on {r.owner} "
                f"{list(r.shape[1:])} {r.dtype}; delete the wrong part")


class Catalog(abc.ABC):
    """Cluster-wide, locally answered view of which node holds which dataset part."""

    #: Whether other nodes' changes are pushed here moments after they happen (so that
    #: waiting for one to show is worth it), rather than found by a later lookup.
    pushed = True

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def announce(self, rec: DatasetRecord) -> None:
        """Publish that this node now holds ``rec`` (new or replaced)."""

    @abc.abstractmethod
    def retract(self, key: str) -> None:
        """Publish that this node no longer holds ``key``."""

    @abc.abstractmethod
    def add_peer(self, info: PeerInfo, verified: bool = False) -> None:
        """Learn of a peer (from ``--peer``, a hello, or gossip); ``verified``: its claim
        to the name was already checked against a live member of that name."""

    @abc.abstractmethod
    def answers_as(self, info: PeerInfo) -> bool:
        """Whether ``info.rpc`` answers now with exactly this descriptor (name, epoch and
        endpoints): the only proof a node is what a descriptor says (blocks for a probe)."""

    @abc.abstractmethod
    def claim_conflict(self, info: PeerInfo) -> PeerInfo | None:
        """The live member already using ``info.name``, if it still answers as itself
        (``info`` is then a second daemon with the same name, not a restart)."""

    @abc.abstractmethod
    def nodes(self) -> list[NodeView]:
        """Every known member, self included, with liveness and load."""

    def member(self, name: str) -> NodeView | None:
        """The member called ``name`` (ourselves included), or None (implementations
        look it up without listing every member)."""
        return next((v for v in self.nodes() if v.info.name == name), None)

    @abc.abstractmethod
    def records(self, include_dead: bool = False) -> list[DatasetRecord]:
        """Every record on live nodes (or on all known nodes)."""

    @abc.abstractmethod
    def wait_changed(self, timeout: float) -> None:
        """Block (cooperatively) until the catalog changes or ``timeout`` passes."""

    def records_named(self, name: str, include_dead: bool = False) -> list[DatasetRecord]:
        """The records of dataset ``name`` (implementations index them)."""
        return [r for r in self.records(include_dead) if r.name == name]

    def slices_of(self, name: str) -> list[DatasetRecord]:
        """Live slices (``NAME:rowsLO-HI`` copies) of dataset ``name``."""
        return [r for r in self.records() if r.lineage.get("slice_of") == name]

    def published(self) -> int:
        """Updates this node has published in this run (the sequence number of its
        catalog stream; 0: none, so a new member's table is known to be empty)."""
        return 0

    def bootstrap(self, source: PeerInfo) -> None:
        """We joined through ``source``: take the catalog as it holds it (once per run;
        an implementation that needs no initial state ignores this)."""
        return None

    def settling(self) -> bool:
        """True while this replica may still be filling (the node has just started or is
        syncing a peer): a dataset missing now may be there a moment later."""
        return False

    def locate(self, name: str) -> Location:
        try:
            return locate(name, self.records_named(name),
                          self.records_named(name, include_dead=True))
        except DatasetNotFound:
            dead = sorted({r.owner for r in self.records_named(name, include_dead=True)})
            if dead:
                raise DatasetNotFound(f"{name} is only on {', '.join(dead)}, which "
                                      f"{'is' if len(dead) == 1 else 'are'} not alive") from None
            raise

    def wait_for(self, name: str, timeout: float) -> Location:
        """Return the location of ``name`` once all its parts are on live nodes."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            self.forget(name)
            try:
                loc = self.locate(name)
                if loc.complete:
                    return loc
            except DatasetNotFound:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatasetNotFound(f"{name} did not appear on a live node within {timeout:g} s")
            self.wait_again(remaining, attempt)
            attempt += 1

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Block (cooperatively) until ``done()`` holds, checked again whenever the
        catalog changes, for at most ``timeout`` seconds; returns whether it holds."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.wait_changed(remaining)
        return True

    def forget(self, name: str) -> None:
        """Drop what is cached of ``name``, so the next lookup asks afresh (``wait_for``
        polls past any cache); nothing to drop in a catalog that caches nothing."""
        return None

    def wait_again(self, remaining: float, attempt: int) -> None:
        """Between two looks of ``wait_for``: until the catalog changes (a catalog whose
        changes are pushed here), at most ``remaining`` seconds."""
        self.wait_changed(remaining)

    def snapshot(self, names: Iterable[str] | None = None) -> CatalogSnapshot:
        """An immutable picture; with ``names``, of those datasets' records only (what a
        plan reads: the whole catalog may hold thousands of intermediates)."""
        if names is None:
            return CatalogSnapshot(self.self_name, tuple(self.records()), tuple(self.nodes()),
                                   tuple(self.records(include_dead=True)))
        wanted = list(dict.fromkeys(names))
        live = tuple(r for n in wanted for r in self.records_named(n))
        known = tuple(r for n in wanted for r in self.records_named(n, include_dead=True))
        return CatalogSnapshot(self.self_name, live, tuple(self.nodes()), known)

    @property
    @abc.abstractmethod
    def self_name(self) -> str: ...
