"""A rogue "peer" as a real process (issue 11, item 3 a and c), without keys: what the
attack needs is only to say hello and run a PUB socket (``tests/rogue.py``).

* (c) It gossips, says hello with, and heartbeats as, a descriptor of member ``v``
  with a later epoch (a minute ahead of the clock; a huge one too), v's own RPC
  endpoint and the rogue's PUB.  Believed, every node read v's catalog from the rogue
  and ignored the real v, even after v restarted.  Now a descriptor is believed only
  when its own RPC endpoint answers with exactly it, and an epoch a day ahead of the
  clock never is.
* (a) It announces, under a name a live node holds, its own bytes with a higher
  version (valid digests: it is a real node that skips the put rules).  Fetches used
  to return its bytes through every node.  Now two holders of one name with different
  bytes are a ``DatasetConflict`` at any version: the rogue's bytes are never served.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from hpcflow.errors import ConfigError, DatasetConflict
from hpcflow.rpc import strict
from tests.conftest import SCALE, TTL, Cluster, FakePeer, NodeProc, names_on, wait_for


class Rogue(NodeProc):
    """``python -m tests.rogue``: a real daemon changed as ``conf`` says."""

    def __init__(self, name: str, data_dir: Path, peers: list[str], conf: dict[str, object]
                 ) -> None:
        super().__init__(name, data_dir, peers, [])
        self.prefix = ["env", "HPCFLOW_ROGUE=" + json.dumps(conf)]

    def argv(self) -> list[str]:
        args = super().argv()
        i = args.index("hpcflow")  # "-m hpcflow node" -> "-m tests.rogue"
        return [*args[:i], "tests.rogue", *args[i + 2:]]


def _view(node: NodeProc, name: str) -> tuple[int, str, bool] | None:
    with node.client() as c:
        for n in c.nodes():
            if n["name"] == name:
                return n["epoch"], n["pub"], n["alive"]
    return None


def _refused(node: NodeProc) -> int:
    """Forged descriptors ``node`` has refused so far (not confirmed, or from the future)."""
    with node.client() as c:
        cat = c.stats()["catalog"]
    return int(cat["unverified"]) + int(cat["future_epochs"])


def test_a_rogue_cannot_take_over_a_members_name(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        v = c.add("v", via="n1")
        n3 = c.add("n3", via="v")
        c.wait_members()
        honest = (n1, n3)
        # An epoch a minute ahead passes the clock check: only the probe of v's own RPC
        # endpoint can tell it is false.  (A huge one is refused outright: below.)
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc],
                      {"impersonate": "v", "epoch_ahead_s": 60.0})
        c.nodes["evil"] = rogue
        rogue.start()
        real = (v.info["epoch"], v.info["pub"], True)

        def refused_more(node: NodeProc, than: int) -> bool:
            return _refused(node) >= than + 2

        # While v lives: the rogue's hellos, gossip and heartbeats as v change nothing.
        for n in honest:
            wait_for(lambda n=n: refused_more(n, 0), 10, f"{n.name} to refuse the forgeries")
            assert _view(n, "v") == real
            assert _view(n, "evil") is not None  # it did join, under its own name
        with v.client() as cl:
            cl.put("BEFORE", np.arange(3.0))
        for n in honest:
            wait_for(lambda n=n: "BEFORE" in names_on(n), 10, f"v's put on {n.name}")

        # v is killed: the rogue's descriptor must not be taken while v is silent.
        v.kill(signal.SIGKILL)
        for n in honest:
            wait_for(lambda n=n: _view(n, "v") == (*real[:2], False), 10 + TTL,
                     f"{n.name} to see v dead")
        counts = {n.name: _refused(n) for n in honest}
        for n in honest:
            wait_for(lambda n=n: refused_more(n, counts[n.name]), 10,
                     f"{n.name} to refuse forgeries while v is down")
            assert _view(n, "v") == (*real[:2], False)

        # v restarts (a larger epoch than its last, smaller than the rogue's): heard by all.
        v.start()
        again = (v.info["epoch"], v.info["pub"], True)
        assert again[0] > real[0]
        with v.client() as cl:
            cl.put("AFTER", np.arange(4.0))
        for n in honest:
            wait_for(lambda n=n: _view(n, "v") == again, 10, f"{n.name} to hear v again")
            wait_for(lambda n=n: "AFTER" in names_on(n), 10, f"v's new put on {n.name}")
        time.sleep(TTL * SCALE + 0.5)  # and it stays so past a TTL of the rogue's beats
        for n in honest:
            assert _view(n, "v") == again
            with n.client() as cl:
                assert cl.fetch("AFTER").tolist() == [0.0, 1.0, 2.0, 3.0]
        assert rogue.alive()  # the rogue kept at it all along
        huge = {"name": "v", "epoch": 2**62, "rpc": v.info["rpc"], "pub": v.info["pub"],
                "bulk": v.info["bulk"]}
        with strict.Client(timeout=10 * SCALE) as raw:
            raw.connect(n1.rpc)
            with pytest.raises(ConfigError, match="ahead of this node's clock"):
                raw.call("hello", huge)
        assert _view(n1, "v") == again
    finally:
        c.stop()


def test_a_rogue_announcement_never_shadows_a_live_holders_dataset(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        n2 = c.add("n2", via="n1")
        c.wait_members()
        with n1.client() as cl:
            real = cl.put("X", np.ones((50, 2)))
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc], {"no_rules": True})
        c.nodes["evil"] = rogue
        rogue.start()
        with rogue.client() as cl:  # its own bytes under X, three versions above n1's
            for i in range(3):
                fake = cl.put("X", np.zeros((50, 2)), overwrite=bool(i))
        assert fake.version > real.version and fake.checksum != real.checksum

        def sees_fake(n: NodeProc) -> bool:
            with n.client() as cl:
                return any(r.owner == "evil" and r.version == fake.version
                           for r in cl.catalog() if r.name == "X")

        for n in (n1, n2):
            wait_for(lambda n=n: sees_fake(n), 10, f"{n.name} to hear evil's X")
            with n.client() as cl:  # the rogue's bytes are never served as X
                with pytest.raises(DatasetConflict, match="evil"):
                    cl.fetch("X")
                with pytest.raises(DatasetConflict):
                    cl.run("colsum", "X").fetch()
        # Once the rogue is gone, X is n1's again everywhere, and a copy of it (same
        # bytes on another node: a replica, not a conflict) is served too.
        rogue.kill(signal.SIGKILL)
        for n in (n1, n2):
            with n.client() as cl:
                wait_for(lambda cl=cl: not [v for v in cl.nodes()
                                            if v["name"] == "evil" and v["alive"]],
                         10 + TTL, f"{n.name} to see evil dead")
                assert cl.fetch("X").tolist() == np.ones((50, 2)).tolist()
        with n2.client() as cl:
            assert [r.owner for r in cl.replicate("X")] == ["n2"]
            loc = cl.locate("X")
            assert sorted(h["owner"] for h in loc["parts"][0]["holders"]) == ["n1", "n2"]
            assert cl.run("colsum", "X").fetch().tolist() == [50.0, 50.0]
    finally:
        c.stop()


def test_gossiped_members_must_answer_before_they_cost_anything(tmp_path: Path) -> None:
    """A "peer" gossips 2000 made-up members every beat.  Each used to become a member
    with a SUB socket and a greenlet on every node (2000 more file descriptors per beat
    of new names); now each is probed first and, answering nothing, ignored."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        assert n1.proc is not None
        fd_dir = Path(f"/proc/{n1.proc.pid}/fd")
        fds = len(os.listdir(fd_dir))
        with n1.client() as cl:
            cl.put("STILL", np.arange(2.0))
        with FakePeer("gossip", n1) as g:
            fakes = [{"name": f"fake{i}", "epoch": 1, "rpc": f"tcp://127.0.0.1:{20000 + i}",
                      "pub": f"tcp://127.0.0.1:{40000 + i}", "bulk": "tcp://127.0.0.1:9"}
                     for i in range(2000)]
            beat = msgpack.packb({"s": "gossip", "e": 1, "q": 0,
                                  "p": {"members": [g.info, *fakes]}})

            def probed_many() -> bool:
                g.send([b"HB", beat])
                with n1.client() as cl:
                    return bool(cl.stats()["catalog"]["unverified"] >= 100)

            wait_for(probed_many, 20, "n1 to probe the gossiped members")
            with n1.client() as cl:
                assert {v["name"] for v in cl.nodes()} == {"n1", "gossip"}
                assert cl.fetch("STILL").tolist() == [0.0, 1.0]
            assert len(os.listdir(fd_dir)) < fds + 50
    finally:
        c.stop()


def test_a_remembered_member_cannot_make_a_restarted_node_stop(tmp_path: Path) -> None:
    """A restarted node says hello to the members its data dir remembers.  One of them,
    a rogue, answers that the node's name is taken: that used to stop the node (exit 2)
    on every restart.  Only a peer the node is told to join through (``--peer``) can."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        n2 = c.add("n2", via="n1")
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc], {"refuse_hello": True})
        c.nodes["evil"] = rogue
        rogue.start()
        remembered = n2.data_dir / "members.json"
        wait_for(lambda: remembered.exists() and rogue.rpc in json.loads(
            remembered.read_text()), 10, "n2 to remember evil")
        n2.kill(signal.SIGTERM)
        n2.start()
        wait_for(lambda: "remembered member" in n2.log_path.read_text()
                 and rogue.rpc in n2.log_path.read_text().rsplit("node n2 ready", 1)[-1],
                 10, "n2 to be refused by evil")
        time.sleep(TTL * SCALE)
        assert n2.alive(), n2.log_tail()
        with n1.client() as cl:
            wait_for(lambda: any(v["name"] == "n2" and v["alive"] for v in cl.nodes()), 10,
                     "n1 to see n2 back")
    finally:
        c.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_catalog_messages_are_refused_before_they_are_allocated(tmp_path: Path) -> None:
    """A member's PUB sends 64 MiB messages (a catalog message is at most 4 MiB): each
    used to be received whole into the node's memory (580 MB for a few seconds of them,
    up to 2 GB for one) before decode refused it.  Now libzmq drops the connection first
    and the member is cut off (then dead); a message over 4 MiB but within the SUB's
    limit is dropped as malformed as before, and the stream goes on."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        n2 = c.add("n2", via="n1")
        c.wait_members()
        assert n1.proc is not None
        with FakePeer("flood", n1) as f:
            def beat() -> bool:
                f.send([b"HB", msgpack.packb({"s": "flood", "e": 1, "q": 0, "p": {}})])
                with n1.client() as cl:
                    return any(v["name"] == "flood" and v["alive"] for v in cl.nodes())

            wait_for(beat, 10, "flood's heartbeats")
            f.send([b"HB", b"x" * (5 << 20)])  # too big to decode, not to receive

            def malformed_then_alive() -> bool:
                with n1.client() as cl:
                    return bool(cl.stats()["catalog"]["malformed"] >= 1) and beat()

            wait_for(malformed_then_alive, 10, "the 5 MiB message dropped, the stream on")
            before = _rss_kib(n1.proc.pid)
            big = b"x" * (64 << 20)
            for _ in range(12):
                f.send([b"HB", big])
            for _ in range(3):
                f.send([b"HB", msgpack.packb({"s": "flood", "e": 1, "q": 0, "p": {}})])

            def flood_dead() -> bool:
                with n1.client() as cl:
                    return not any(v["name"] == "flood" and v["alive"] for v in cl.nodes())

            wait_for(flood_dead, 10 + TTL, "the flooding member to be cut off")
            assert _rss_kib(n1.proc.pid) - before < 40 * 1024
            with n1.client() as cl:
                assert cl.stats()["catalog"]["malformed"] == 1  # the big ones never decoded
                assert any(v["name"] == "n2" and v["alive"] for v in cl.nodes())
            # n2 cuts flood off in its own time; a put claims its name with every member n2
            # still counts alive (and flood, a fake, answers no claims).
            def flood_dead_on_n2() -> bool:
                with n2.client() as cl:
                    return not any(v["name"] == "flood" and v["alive"] for v in cl.nodes())

            wait_for(flood_dead_on_n2, 10 + TTL, "n2 to cut the flooding member off too")
            with n2.client() as cl:
                cl.put("AFTER", np.arange(2.0))
            wait_for(lambda: "AFTER" in names_on(n1), 10, "n2's put on n1")
    finally:
        c.stop()
