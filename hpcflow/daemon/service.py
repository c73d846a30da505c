"""The daemon's RPC surface (served over zerorpc's protocol by ``rpc/strict.py``).

Every argument arrives from the network and is validated here or below;
every answer is msgpack-safe (no numpy types).  Errors are raised as hpcflow
errors and reach the caller under the same class name.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .._version import __version__
from ..catalog.membership import MAX_EPOCH_AHEAD_S, PeerInfo, epoch_ahead_s
from ..catalog.record import (
    validate_dtype,
    validate_flag,
    validate_name,
    validate_part,
    validate_shape,
)
from ..errors import (
    ConfigError,
    DatasetNotFound,
    HpcflowError,
    InvalidData,
    NotFlowOwner,
    Overloaded,
    PeerUnavailable,
)
from ..rpc import strict
from ..rpc.messages import InputRef, RunRequest, Share
from ..rpc.quota import ByteQuota
from . import h5mdmeta, run, saving
from .datasets import Datasets
from .parts import ServedNode
from .worker import Worker

log = logging.getLogger("hpcflow.rpc")

F = TypeVar("F", bound=Callable[..., Any])
#: Calls only nodes make of each other (or the centralised baseline, holding the node
#: key): with keys, a client key making one gets PermissionDenied (``rpc/strict.py``).
#: ``cleanup`` and ``replicate`` stay open to scripts (``Flow.close``, ``Client.replicate``);
#: a client's ``cleanup`` only removes what its own flow made (``run.cleanup``, with the
#: flow's secret).
NODE_ONLY = frozenset({"hello", "snapshot", "pull", "run_share", "cancel_share", "run_op",
                       "delete_parts", "flow_status", "claim", "release_claim", "claim_stands",
                       "save_part", "aux"})
#: Inline put/fetch bytes at most (the RPC server takes messages of at most 16 MiB).
MAX_RPC_PAYLOAD = 15 * 1024 * 1024


def exposed(fn: F) -> F:
    """Log failures once and keep unexpected errors typed.

    Calls are not load by themselves (an idle ``wait`` or an initiator's own
    ``execute`` is no work for the planner to avoid): ops running or queued
    and transfers count, see :meth:`~hpcflow.daemon.worker.Worker.busy`.
    """

    @functools.wraps(fn)
    def wrapper(self: NodeService, *args: Any) -> Any:
        try:
            return fn(self, *args)
        except HpcflowError as exc:
            log.info("rpc %s failed: %s: %s", fn.__name__, type(exc).__name__, exc)
            raise
        except TypeError as exc:  # wrong arity or argument types from the caller
            raise InvalidData(f"bad arguments to {fn.__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class NodeService:
    """Methods callable over RPC.  Thin: the work happens in the node's parts
    (:class:`~hpcflow.daemon.worker.Worker`, :class:`~hpcflow.daemon.datasets.Datasets`,
    :mod:`.run`)."""

    def __init__(self, node: ServedNode, worker: Worker, datasets: Datasets) -> None:
        self.node = node
        self.worker = worker
        self.datasets = datasets
        #: Bytes of inline puts being stored and of inline fetch replies being built or
        #: still queued for their clients.
        self.inline = ByteQuota("inline put/fetch", node.config.max_inline_bytes_per_connection,
                                node.config.max_inline_bytes)

    @exposed
    def ping(self) -> dict[str, Any]:
        """Who answers here; ``self`` (the whole descriptor) is what peers check a
        descriptor they were told of against before they believe it."""
        return {"name": self.node.name, "epoch": self.node.epoch,
                "self": self.node.me.to_wire(), "seq": self.node.catalog.published(),
                "ops": self.node.registry.hashes(), "load": self.node.load()}

    @exposed
    def info(self) -> dict[str, Any]:
        n = self.node
        nodes = n.catalog.nodes()
        return {
            "name": n.name, "version": __version__, "epoch": n.epoch, "pid": n.pid,
            "endpoints": n.me.to_wire(), "catalog_mode": n.config.catalog,
            "load": n.load(),
            "datasets": len(n.store.records()),
            "bytes_stored": sum(r.nbytes for r in n.store.records()),
            "catalog_entries": len(n.catalog.records()),
            "peers_alive": sorted(v.info.name for v in nodes if v.alive and v.info.name != n.name),
            "peers_dead": sorted(v.info.name for v in nodes if not v.alive),
            "ops": n.registry.hashes(),
        }

    @exposed
    def hello(self, descriptor: Any) -> dict[str, Any]:
        """A node introduces itself; refused (ConfigError) when its name is taken by a
        live member, including one other than us (checked by pinging that member)."""
        info = PeerInfo.from_wire(descriptor)
        ahead = epoch_ahead_s(info.epoch)
        if ahead > MAX_EPOCH_AHEAD_S:
            raise ConfigError(f"{info.name}'s epoch is {ahead:.0f} s ahead of this node's "
                              "clock: check the clocks of both hosts")
        if info.name != self.node.name and not self.node.catalog.answers_as(info):
            raise PeerUnavailable(f"hello from {info.name!r}: nothing answers as that node "
                                  f"(epoch {info.epoch}, with the endpoints it gave) at "
                                  f"{info.rpc}")
        if info.name == self.node.name and info.epoch != self.node.epoch:
            self.node.catalog.add_peer(info)  # checks which of us two started first
            raise ConfigError(f"the node name {info.name!r} is already used by the node at "
                              f"{self.node.me.rpc}: give every node a unique --name")
        owner = self.node.catalog.claim_conflict(info)
        if owner is not None:
            raise ConfigError(f"the node name {info.name!r} is already used by the node at "
                              f"{owner.rpc}, which is still running: give every node a "
                              "unique --name")
        self.node.catalog.add_peer(info, verified=True)
        return {"self": self.node.me.to_wire(),
                "members": [v.info.to_wire() for v in self.node.catalog.nodes() if v.alive]}

    @exposed
    def snapshot(self, origins: Any = None) -> dict[str, Any]:
        """The catalog as this node holds it: all of it (``origins`` nil; refused with
        ``CatalogBusy`` past a few at once), the sections of the named origins, or
        (``[]``) just its per-origin vector (see ``catalog/replicated.py``)."""
        return self.node.catalog_snapshot_wire(origins)

    @exposed
    def catalog(self, include_dead: bool = False) -> dict[str, Any]:
        cat = self.node.catalog
        return {"nodes": [v.to_wire() for v in cat.nodes()],
                "records": [r.to_wire() for r in cat.records(bool(include_dead))]}

    @exposed
    def locate(self, name: Any) -> dict[str, Any]:
        loc = self.node.catalog.locate(validate_name(name))
        out = loc.to_wire()
        out["bulk"] = self.node.bulk_endpoints(loc.owners)
        return out

    @exposed
    def wait(self, name: Any, timeout_s: Any = 10.0) -> dict[str, Any]:
        """Block until every part of ``name`` is on a live node (at most ``timeout_s``)."""
        if (isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
                or not math.isfinite(timeout_s) or timeout_s < 0):
            raise InvalidData(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
        loc = self.node.catalog.wait_for(validate_name(name), min(float(timeout_s), 3600.0))
        return {**loc.to_wire(), "bulk": self.node.bulk_endpoints(loc.owners)}

    @exposed
    def describe(self, name: Any, part: Any = None) -> dict[str, Any]:
        loc = self.node.catalog.locate(validate_name(name))
        part = validate_part(part)
        parts = [p for p in loc.parts if part is None or p.part == part]
        if not parts:
            raise InvalidData(f"{name} has no part {part}")
        return {**loc.to_wire(), "records": [h.to_wire() for p in parts for h in p.holders]}

    @exposed
    def metadata(self, name: Any, rows: Any = None) -> dict[str, Any]:
        """H5MD metadata of rows ``rows`` (default all) of ``name``: units, source, step
        and time (gathered from the holders; see ``daemon/h5mdmeta.py``)."""
        return h5mdmeta.metadata(self.node, validate_name(name), rows)

    @exposed
    def aux(self, key: Any, version: Any, lo: Any, hi: Any) -> dict[str, Any]:
        """Rows of the per-frame arrays kept here beside a part (for ``metadata``)."""
        return h5mdmeta.local_aux(self.node, key, version, lo, hi)

    @exposed
    def put(self, name: Any, data: Any, shape: Any, dtype: Any, part: Any = None,
            nparts: Any = None, overwrite: Any = False) -> dict[str, Any]:
        """Store a small array sent inline (bulk uploads have no size limit; this has 15 MiB).

        Its bytes count against the inline quota while the put runs (see ``fetch``)."""
        if not isinstance(data, bytes):
            raise InvalidData("data must be bytes")
        if len(data) > MAX_RPC_PAYLOAD:
            raise InvalidData("inline put is limited to 15 MiB: use the bulk path "
                              "(hpcflow.connect(...).put)")
        self._hold_inline(len(data))
        dt = validate_dtype(dtype)
        shp = validate_shape(shape)
        if len(data) != int(np.prod(shp, dtype=np.int64)) * dt.itemsize:
            raise InvalidData(f"{len(data)} bytes do not make an array of shape {shp} {dt}")
        arr = np.frombuffer(data, dtype=dt)
        rec = self.datasets.put_array(validate_name(name), arr.reshape(shp),
                                      part=validate_part(part), nparts=nparts,
                                      overwrite=validate_flag(overwrite, "overwrite"))
        return rec.to_wire()

    @exposed
    def claim(self, request: Any) -> bool:
        """Another node is about to create a name (or part): grant it, or refuse with
        ``DatasetExists``/``InvalidData`` (see ``daemon/claims.py``)."""
        return self.datasets.claims.answer(request)

    @exposed
    def release_claim(self, name: Any, part: Any, by: Any, token: Any) -> bool:
        """The node ``by`` gives back the grant of its claim ``token`` (its put lost or
        failed); False when no such grant is held here."""
        return self.datasets.claims.release(name, part, by, token)

    @exposed
    def claim_stands(self, name: Any, part: Any, token: Any) -> str:
        """Does this node's claim ``token`` on ``name`` (``part``) still stand: "open",
        "stored" or ""?  Asked by an arbiter whose grant of it is in another claim's way."""
        return self.datasets.claims.stands(name, part, token)

    @exposed
    def fetch(self, name: Any, part: Any = None) -> dict[str, Any]:
        """Return a small dataset inline (gathered from its holders if needed).

        Its bytes count against the inline quota (per connection and in total) from
        before the gather until the reply has left the process: over it, ``Overloaded``."""
        name, part = validate_name(name), validate_part(part)
        loc = self.node.catalog.locate(name)
        if loc.nbytes > MAX_RPC_PAYLOAD:
            raise InvalidData(f"{name} has {loc.nbytes} bytes; inline fetch is limited to 15 MiB:"
                              " use the bulk path (hpcflow.connect(...).fetch)")
        self._hold_inline(loc.nbytes)
        arr = self.datasets.gather(name, part)
        # A view, not a copy: msgpack packs it as bytes.
        return {"shape": list(arr.shape), "dtype": arr.dtype.str,
                "data": np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data}

    @exposed
    def delete(self, name: Any, part: Any = None) -> dict[str, Any]:
        """Delete a dataset (or one part) held here.  A flow's intermediate (tagged with
        its flow and not kept) is refused: only its flow's clean-up removes it (the
        flow's script closes it with the flow's secret), so one script cannot pull the
        inputs from under another's running steps."""
        name, part = validate_name(name), validate_part(part)
        for rec in self.node.store.named(name):
            tag = rec.lineage.get("flow")
            if (part is None or rec.part == part) and isinstance(tag, dict) and (
                    not tag.get("keep")):
                raise NotFlowOwner(f"{rec.key} is an intermediate of flow "
                                   f"{rec.lineage.get('workflow')}: it goes when that flow's "
                                   "script closes it")
        return self.datasets.delete(name, part).to_wire()

    @exposed
    def replicate(self, name: Any, part: Any = None) -> list[dict[str, Any]]:
        """Pull a copy of ``name`` (or one part) into this node's store."""
        with self.worker.busy():
            recs = self.datasets.replicate(validate_name(name), validate_part(part))
        return [r.to_wire() for r in recs]

    @exposed
    def ops(self) -> dict[str, str]:
        """Op name -> definition hash of every op this node can run."""
        return self.node.registry.hashes()

    @exposed
    def pull(self, name: Any, rows: Any = None, src: Any = None,
             tag: Any = None) -> dict[str, Any]:
        """Make rows ``[lo, hi)`` (default: all) of ``name`` local, from ``src`` if it can;
        ``tag`` is lineage for what is created.  Returns the copies made and the bytes
        received from each source."""
        ref = InputRef.from_wire({"name": name, "rows": rows})
        if src is not None and not isinstance(src, str):
            raise InvalidData("src must be a node name")
        if tag is not None and not isinstance(tag, dict):
            raise InvalidData("tag must be a map")
        created, moved = self.worker.pull(ref.name, ref.rows, src, tag)
        return {"created": [r.to_wire() for r in created], "moved": moved}

    @exposed
    def run_share(self, share: Any) -> dict[str, Any]:
        """Run this node's share of an execution (see ``rpc.messages``)."""
        return self.worker.shares.run(Share.from_wire(share)).to_wire()

    @exposed
    def cancel_share(self, execution: Any) -> bool:
        """End this node's share of ``execution`` (it removes what it made)."""
        if not isinstance(execution, str):
            raise InvalidData("execution must be an id")
        return self.worker.shares.cancel(execution)

    @exposed
    def run_op(self, request: Any) -> dict[str, Any]:
        """Run an op on local rows and store its output here (see ``daemon.worker``)."""
        return self.worker.run(RunRequest.from_wire(request)).to_wire()  # a RunReply

    @exposed
    def delete_parts(self, items: Any) -> int:
        """Delete the listed ``[name, part]`` entries held here; missing ones are skipped
        (workflow clean-up is best effort and may run twice).  Returns how many went."""
        if not isinstance(items, list) or len(items) > 100_000:
            raise InvalidData("items must be a list of [name, part]")
        removed = 0
        for item in items:
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise InvalidData("items must be a list of [name, part]")
            try:
                self.node.store.delete(validate_name(item[0]), validate_part(item[1]))
                removed += 1
            except DatasetNotFound:
                pass
        return removed

    @exposed
    def plan(self, request: Any) -> dict[str, Any]:
        """Plan a workflow from this node's catalog without running it."""
        return run.plan(self.node, self.worker, request)

    @exposed
    def execute(self, request: Any) -> dict[str, Any]:
        """Plan and run a workflow with this node as the initiator.  Small results ride
        in the reply while the inline quota (per connection and in total, as ``fetch``)
        has room until the reply has left; past it they come back as locations."""
        return run.execute(self.node, self.worker, request, self._admit_inline)

    def _hold_inline(self, nbytes: int) -> None:
        """Count ``nbytes`` against the inline quota of this call's connection (and in
        total) until its reply has left the process; ``Overloaded`` past the quota."""
        release = self.inline.reserve(strict.current_connection(), nbytes)
        if not strict.after_reply(release):
            release()  # not served over RPC: no reply to wait for

    def _admit_inline(self, nbytes: int) -> bool:
        try:
            self._hold_inline(nbytes)
        except Overloaded:
            return False
        return True

    @exposed
    def save(self, wf: Any, output: Any, name: Any, overwrite: Any = False,
             secret: Any = None, options: Any = None) -> dict[str, Any]:
        """Keep a flow's output durably under a user's name: its parts where they are
        (``options["partitioned"]``, the default for a split output) or gathered here
        (``secret``: the flow's, see ``rpc.messages.FlowSecret``; see ``run.save``)."""
        return run.save(self.node, self.worker, wf, output, name, overwrite, secret, options)

    @exposed
    def save_part(self, request: Any) -> dict[str, Any]:
        """Store rows of a flow output held here as (part of) a saved dataset (an
        initiator's partitioned save or restore, see ``daemon.saving``)."""
        return saving.save_part(self.node, self.worker, self.datasets, request).to_wire()

    @exposed
    def lineage(self, name: Any) -> dict[str, Any]:
        """A saved dataset's derivation and where its parts are, dead holders included
        (``hpcflow lineage``, ``recompute``)."""
        return saving.describe(self.node.catalog, validate_name(name))

    @exposed
    def cleanup(self, created: Any, wf: Any = None, secret: Any = None) -> int:
        """Delete what earlier executions created (``[node, name, part]`` triples); with
        ``wf`` and its ``secret``, that flow is closed."""
        return run.cleanup(self.node, self.worker, created, wf, secret)

    @exposed
    def flow_status(self, holder: Any, items: Any) -> list[bool]:
        """A holder's janitor asks which of its workflow intermediates are still wanted."""
        return run.flow_status(self.node, self.worker, holder, items)

    @exposed
    def stats(self) -> dict[str, Any]:
        return {**self.node.stats(), "inline": self.inline.stats()}
