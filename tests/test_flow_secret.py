"""Flows belong to their script (issue 11 follow-ups, items 1 and 2): real daemons.

Another script holding the client key sees a flow's id in the catalog (the
lineage of its datasets).  It must not be able to close the flow, clean up or
save its datasets, or run steps in it (each ``NotFlowOwner``), nor take the
names the flow's next steps will have (``InvalidName``): the flow's next step
must then run as if nobody had tried.  Without keys the same rules hold (there
they guard against accidents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpcflow
from hpcflow.errors import InvalidData, InvalidName, NotFlowOwner, PermissionDenied
from hpcflow.rpc import auth, strict
from hpcflow.rpc.messages import FlowSecret
from tests.conftest import SCALE, Cluster, NodeProc, wait_for


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.KEYS_ENV, raising=False)


def flow_items(c: hpcflow.Client, wf: str) -> list[list[Any]]:
    """What any client can learn of flow ``wf`` from the catalog: its datasets."""
    return [[r.owner, r.name, r.part] for r in c.catalog() if r.lineage.get("workflow") == wf]


def execute_request(wf: str, out: str, op: str, inputs: list[str],
                    secret: str | None) -> dict[str, Any]:
    return {"wf": wf, "steps": [{"out": out, "op": op, "inputs": inputs, "params": {}}],
            "deliver": [out], "secret": secret}


def test_another_script_cannot_close_clean_up_save_or_extend_a_flow(
        keyed: Cluster, keys: Path) -> None:
    """The attack as reported: B reads A's flow id from the catalog and cleans up."""
    with keyed["n1"].client(keys=str(keys)) as a, keyed["n2"].client(keys=str(keys)) as b:
        scaled = a.run("scale", "D", factor=2.0)
        assert np.array_equal(scaled.fetch(), np.full((1000, 3), 2.0))
        wf = a.flow.id
        assert wf not in repr(a.flow.secret) and a.flow.secret.value not in repr(a.flow)
        # B finds A's flow in the catalog (and nothing there gives the secret away).
        wait_for(lambda: flow_items(b, wf), 10, "A's outputs in n2's catalog")
        items = flow_items(b, wf)
        assert all(a.flow.secret.value not in str(r.lineage) for r in b.catalog())
        mine = b.flow.secret.to_wire()
        for secret in (None, mine):  # no secret, or B's own
            with pytest.raises(NotFlowOwner, match=wf):
                b._call("cleanup", items, wf, secret)
            with pytest.raises(NotFlowOwner, match=wf):
                b._call("save", wf, scaled.name, "STOLEN", False, secret)
            # B tries to take A's next output name by running a step in A's flow.
            with pytest.raises(NotFlowOwner, match=wf):
                b._call("execute", execute_request(wf, f"{wf}.2.colsum", "colsum", ["D"],
                                                   secret))
        assert isinstance(NotFlowOwner("x"), PermissionDenied)
        # Nor delete A's intermediate where it lies (the input of A's next step).
        for owner, name, part in items:
            with keyed[owner].client(keys=str(keys)) as at_holder, pytest.raises(
                    NotFlowOwner, match="intermediate of flow"):
                at_holder.delete(name, part)
        # B's own flow may not save A's outputs, nor clean them up (they are not B's).
        with pytest.raises(InvalidData, match="not an output of flow"):
            b._call("save", b.flow.id, scaled.name, "STOLEN", False, mine)
        assert b._call("cleanup", items, b.flow.id, mine) == 0
        assert sorted(flow_items(b, wf)) == sorted(items)
        assert "STOLEN" not in {r.name for r in b.catalog()}
        # A's next step runs on: its input is still there, its name still free.
        total = a.run("colsum", scaled)
        assert total.name == f"{wf}.2.colsum"
        assert total.fetch().tolist() == [2000.0] * 3
        # and A itself closes its flow: everything it made goes.
        assert a.flow.close() > 0
        wait_for(lambda: not flow_items(b, wf), 10, "A's flow to be cleaned up")


def test_flow_output_names_are_reserved_for_their_flow(keyed: Cluster, keys: Path) -> None:
    with keyed["n1"].client(keys=str(keys)) as a, keyed["n2"].client(keys=str(keys)) as b:
        first = a.run("scale", "D", factor=3.0)
        first.fetch()
        wf, mine = a.flow.id, b.flow.secret.to_wire()
        nxt = f"{wf}.2.fft"  # the name A's next step will have
        # Puts of flow names are refused, by every path, before anything is stored.
        with pytest.raises(InvalidName, match="reserved for flows"):
            b.put(nxt, np.zeros((1000, 3)))
        with pytest.raises(InvalidName, match="reserved for flows"):
            b._call("put", nxt, np.zeros(3).tobytes(), [1, 3], "<f8")
        with pytest.raises(InvalidName, match="reserved for flows"):
            b.put(f"{wf}.7.colsum.partial0", np.zeros((4, 3)))
        with pytest.raises(InvalidName, match="reserved for flows"):
            first.save(f"{wf}.9.kept")
        # execute makes only names of its own flow's form.
        for out in (nxt, "VICTIM", f"{b.flow.id}.x.fft", f"{b.flow.id}.2.colsum",
                    f"{b.flow.id}.2.fft.extra"):
            with pytest.raises(InvalidName, match=r"must be named wf-[0-9a-f]{24}\.<n>\.fft"):
                b._call("execute", execute_request(b.flow.id, out, "fft", ["D"], mine))
        with pytest.raises(InvalidData, match="flow id"):
            b._call("execute", execute_request("wf-1", "wf-1.1.fft", "fft", ["D"], mine))
        names = {r.name for r in b.catalog()}
        assert not {nxt, "VICTIM", f"{wf}.9.kept"} & names
        assert not any(n.startswith(b.flow.id) for n in names)
        # A user's name that merely looks similar is fine, and A's next step runs.
        b.put("wf-notes.2.fft", np.zeros((2, 3)))
        b.delete("wf-notes.2.fft")
        step = a.run("fft", first)
        assert step.name == nxt
        assert np.allclose(step.fetch(), np.fft.fft(np.full((1000, 3), 3.0), axis=1))


def flow_status(node: NodeProc, holder: str, item: list[Any]) -> bool:
    """Ask the initiator's book (a node-to-node call: open without keys)."""
    rogue = strict.Client(timeout=15 * SCALE)
    try:
        rogue.connect(node.rpc)
        return bool(rogue.call("flow_status", holder, [item])[0])
    finally:
        rogue.close()


def test_without_keys_a_flow_is_closed_only_by_its_script(tmp_path: Path) -> None:
    """No keys: the secret still keeps one script from closing another's flow (the
    janitors would then drop everything it made) or cleaning up its datasets."""
    c = Cluster(tmp_path)
    try:
        c.add("n1")
        with c["n1"].client() as a, c["n1"].client() as b:
            a.put("E", np.arange(12.0).reshape(4, 3))
            out = a.run("scale", "E", factor=2.0)
            out.fetch()
            wf = a.flow.id
            rec = next(r for r in b.catalog() if r.name == out.name)
            wanted = [wf, rec.lineage["flow"]["execution"], rec.name, False]
            assert flow_status(c["n1"], "n1", wanted)  # open
            items = flow_items(b, wf)
            with pytest.raises(NotFlowOwner):
                b._call("cleanup", items, wf)
            with pytest.raises(NotFlowOwner):
                b._call("cleanup", items, wf, FlowSecret.new().to_wire())
            # B's own flow, by mistake naming A's datasets: they are left alone.
            assert b._call("cleanup", items, b.flow.id, b.flow.secret.to_wire()) == 0
            assert flow_status(c["n1"], "n1", wanted)  # still open
            assert sorted(flow_items(b, wf)) == sorted(items)
            assert np.allclose(a.run("colsum", out).fetch(), 2 * np.arange(12.0).reshape(4, 3)
                               .sum(0))
            assert a.flow.close() > 0
            assert not flow_status(c["n1"], "n1", wanted)  # closed by its own script
    finally:
        c.stop()
