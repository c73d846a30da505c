"""A rogue "node" for the hostile-peer tests: a real ``hpcflow node`` process, changed
the way an attacker who can run code next to a cluster would change it.

Run as ``python -m tests.rogue NODE-ARGS...``; ``HPCFLOW_ROGUE`` (JSON) says what to do:

* ``"impersonate": NAME`` -- every heartbeat gossips a descriptor for member NAME
  with a huge epoch (2^62 ns, or ``"epoch_ahead_s"`` ahead of now), NAME's own RPC endpoint and this
  process' PUB and bulk endpoints; every heartbeat period it also says ``hello`` with
  that descriptor to every member, and publishes heartbeats *as* NAME on its own PUB.
  Believed, every node would read NAME's catalog from this process and ignore the
  real NAME's heartbeats, even after it restarts (issue 11, item 3 c).
* ``"no_rules": true`` -- this node's puts skip the cluster's rules and claims: it
  stores and announces any name, even one another node holds, and a client can bump
  its version with ``overwrite=True`` (issue 11, item 3 a).

* ``"silent_claims": true`` -- never answers a ``claim`` (the call stays open, with
  heartbeats, while the node goes on heartbeating as a healthy member), to hold
  every other node's puts at their commit.

* ``"drop_releases": true`` -- answers every ``release_claim`` as done but keeps the
  grant, as an arbiter that never got the release would: a grant standing in the way
  of a later claim must then be checked with its claimant.

* ``"refuse_hello": true`` -- answers every ``hello`` with the error a member gives a
  node whose name is taken (``ConfigError``), to make a node that says hello to it
  believe it is a duplicate and stop.

* ``"forge_relay": NAME`` -- every heartbeat period it also publishes, as a relay
  would pass them on, updates *from* member NAME (NAME's epoch, its next sequence
  numbers, signed with the rogue's own key): a record ``FORGED`` owned by NAME, and
  the deletion of every record of NAME's it knows (issue 12, item 2).

* ``"forge_snapshot": NAME`` -- the catalog snapshots it serves carry, in NAME's
  section, only a record ``FORGED`` owned by NAME (signed with the rogue's key) in
  place of NAME's real records: a joiner that takes its catalog from the rogue must
  refuse it and get NAME's records elsewhere.

It talks the real protocols with the real code: what it sends is exactly what a
patched daemon would send.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

import gevent

from hpcflow.catalog import replicated
from hpcflow.catalog.kvmsg import HB, KV, KVMsg
from hpcflow.daemon import claims, datasets, members
from hpcflow.errors import ConfigError, HpcflowError
from hpcflow.rpc import greenio

CONF: dict[str, Any] = json.loads(os.environ.get("HPCFLOW_ROGUE", "{}"))
NODE: list[Any] = []  # the Node, once Members is made


def _impersonate(victim: str, epoch: int) -> None:
    orig_init = members.Members.__init__
    orig_hb = replicated.ReplicatedCatalog._heartbeat

    def init(self: members.Members, node: Any, refused: Any) -> None:
        orig_init(self, node, refused)
        NODE.append(node)

    def forged(cat: replicated.ReplicatedCatalog) -> dict[str, Any] | None:
        st = cat.peers.get(victim)
        if st is None:
            return None
        return {"name": victim, "epoch": epoch, "rpc": st.info.rpc, "pub": cat.me.pub,
                "bulk": cat.me.bulk}

    def heartbeat(self: replicated.ReplicatedCatalog) -> KVMsg:
        msg = orig_hb(self)
        fake = forged(self)
        if fake is None:
            return msg
        msg.props["members"].append(fake)
        assert self._pub is not None  # heartbeats as the victim, on our own PUB
        greenio.send_multipart(self._pub, KVMsg(HB, victim, epoch, 0, props={
            "load": {}, "members": [fake], "ops": {}}).encode())
        node = NODE[0]
        for st in list(self.peers.values()):
            if st.alive and st.info.name != victim:
                gevent.spawn(_hello, node, st.info.rpc, fake)
        return msg

    members.Members.__init__ = init  # type: ignore[method-assign]
    replicated.ReplicatedCatalog._heartbeat = heartbeat  # type: ignore[method-assign]


def _forged_record(victim: str) -> dict[str, Any]:
    return {"name": "FORGED", "part": None, "owner": victim, "shape": [1], "dtype": "<f8",
            "nbytes": 8, "checksum": "xxh3:0", "chunk_bytes": 4096, "version": 1}


def _forge_relay(victim: str) -> None:
    orig_hb = replicated.ReplicatedCatalog._heartbeat

    def heartbeat(self: replicated.ReplicatedCatalog) -> KVMsg:
        msg = orig_hb(self)
        st = self.peers.get(victim)
        if st is None:
            return msg
        assert self._pub is not None
        seq = st.seq
        updates: list[tuple[str, dict[str, Any] | None]] = [("FORGED", _forged_record(victim))]
        updates += [(key, None) for key in self.peer_records.get(victim, {})]
        for key, value in updates:
            seq += 1
            sig = self.signer.sign(KV, victim, st.info.epoch, seq, key, value)
            greenio.send_multipart(self._pub, KVMsg(KV, victim, st.info.epoch, seq, key,
                                                    value, sig=sig).encode())
        return msg

    replicated.ReplicatedCatalog._heartbeat = heartbeat  # type: ignore[method-assign]


def _forge_snapshot(victim: str) -> None:
    orig = replicated.ReplicatedCatalog.snapshot_wire

    def snapshot_wire(self: replicated.ReplicatedCatalog, origins: object = None
                      ) -> dict[str, Any]:
        snap = orig(self, origins)
        for sec in snap.get("origins", []):
            if sec["info"]["name"] == victim:
                value = _forged_record(victim)
                seq = max(1, int(sec["seq"]))
                sig = self.signer.sign(KV, victim, int(sec["info"]["epoch"]), seq, "FORGED",
                                       value)
                sec["entries"] = [["FORGED", seq, value, sig]]
        return snap

    replicated.ReplicatedCatalog.snapshot_wire = snapshot_wire  # type: ignore[method-assign]


def _hello(node: Any, endpoint: str, descriptor: dict[str, Any]) -> None:
    with contextlib.suppress(HpcflowError):  # refused: it tries again next beat
        node.peers.call(endpoint, "hello", descriptor, timeout_s=2.0)


def _no_rules() -> None:
    def admit(catalog: Any, me: str, hdr: dict[str, Any]) -> tuple[Any, ...]:
        return (hdr["name"], hdr.get("part"), tuple(hdr["shape"]), hdr["dtype"])

    def open_claim(self: claims.Claims, name: str, part: int | None, shape: Any,
                   dtype: str) -> claims.Claim:
        c = claims.Claim(name, part, tuple(shape), dtype, (0, "rogue"), won=True)
        c.done.set()
        return c

    datasets.admit_put = admit
    datasets.check_put = lambda *a, **k: None
    claims.Claims.open = open_claim  # type: ignore[method-assign]
    claims.Claims.gate = lambda self, proto: None  # type: ignore[method-assign]


def _refuse_hello() -> None:
    from hpcflow.daemon import service

    def hello(self: Any, descriptor: Any) -> dict[str, Any]:
        raise ConfigError("the node name is already used by the node here: give every node "
                          "a unique --name")

    service.NodeService.hello = hello  # type: ignore[method-assign]


def _silent_claims() -> None:
    from hpcflow.daemon import service

    def claim(self: Any, request: Any) -> bool:
        gevent.sleep(86400)  # answers nothing, ever (its heartbeats keep the call open)
        return True

    service.NodeService.claim = claim  # type: ignore[method-assign]


def _drop_releases() -> None:
    from hpcflow.daemon import service

    def release_claim(self: Any, name: Any, part: Any, by: Any, token: Any) -> bool:
        return True  # "released", but the grant is kept

    service.NodeService.release_claim = release_claim  # type: ignore[method-assign]


def main() -> int:
    if "impersonate" in CONF:
        ahead = CONF.get("epoch_ahead_s")
        epoch = time.time_ns() + int(ahead * 1e9) if ahead is not None else 2**62
        _impersonate(str(CONF["impersonate"]), epoch)
    if "forge_relay" in CONF:
        _forge_relay(str(CONF["forge_relay"]))
    if "forge_snapshot" in CONF:
        _forge_snapshot(str(CONF["forge_snapshot"]))
    if CONF.get("refuse_hello"):
        _refuse_hello()
    if CONF.get("no_rules"):
        _no_rules()
    if CONF.get("silent_claims"):
        _silent_claims()
    if CONF.get("drop_releases"):
        _drop_releases()
    from hpcflow.cli import main as cli

    return cli(["node", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
