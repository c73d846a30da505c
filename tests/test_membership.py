"""The gossip tuning's test-only overrides (``membership.fanin``, ``hb_fanin``) and their use
by the replicated catalog's choice of whom it follows and hears.  In process, no socket is
opened: the catalog is never started and its ``_follow`` is replaced by a recorder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq.green as zmqg

from hpcflow.catalog.membership import (
    FANIN,
    FANIN_ENV,
    HB_FANIN,
    HB_FANIN_ENV,
    PeerInfo,
    PeerState,
    fanin,
    hb_fanin,
    heard_members,
)
from hpcflow.catalog.replicated import ReplicatedCatalog


def test_hb_fanin_defaults_to_the_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HB_FANIN_ENV, raising=False)
    assert hb_fanin() == HB_FANIN


@pytest.mark.parametrize(("value", "want"), [("1", 1), ("2", 2), ("5", 5), ("0", 1),
                                             ("-3", 1), ("two", HB_FANIN), ("", HB_FANIN)])
def test_hb_fanin_override(monkeypatch: pytest.MonkeyPatch, value: str, want: int) -> None:
    """As ``fanin()``: a number from the environment, at least 1 (the ring successor is
    always heard); garbage falls back to the constant."""
    monkeypatch.setenv(HB_FANIN_ENV, value)
    assert hb_fanin() == want


def test_hb_fanin_override_is_independent_of_fanin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HB_FANIN_ENV, "2")
    monkeypatch.delenv(FANIN_ENV, raising=False)
    assert (fanin(), hb_fanin()) == (FANIN, 2)
    monkeypatch.setenv(FANIN_ENV, "4")
    monkeypatch.delenv(HB_FANIN_ENV)
    assert (fanin(), hb_fanin()) == (4, HB_FANIN)


@pytest.fixture
def ctx() -> Iterator[zmqg.Context]:
    ctx = zmqg.Context()
    yield ctx
    ctx.destroy(linger=0)


def _choices(ctx: zmqg.Context, monkeypatch: pytest.MonkeyPatch, members: int
             ) -> tuple[ReplicatedCatalog, dict[str, bool]]:
    """Whom a never-started catalog with ``members`` live peers follows (name -> whether
    it takes that one's heartbeats)."""
    me = PeerInfo("m000", 1, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    cat = ReplicatedCatalog(me, ctx, lambda info, origins: {})
    for i in range(1, members + 1):
        info = PeerInfo(f"m{i:03d}", 1, f"tcp://127.0.0.1:{9000 + i}",
                        f"tcp://127.0.0.1:{9000 + i}", f"tcp://127.0.0.1:{9000 + i}")
        cat.peers[info.name] = PeerState(info, alive=True)
    followed: dict[str, bool] = {}
    monkeypatch.setattr(cat, "_follow", lambda name, endpoint, beats:
                        followed.__setitem__(name, beats))
    cat._choose_follows()
    return cat, followed


def test_the_catalog_hears_as_many_as_the_override_says(
        ctx: zmqg.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FANIN_ENV, raising=False)
    monkeypatch.setenv(HB_FANIN_ENV, "1")
    cat, followed = _choices(ctx, monkeypatch, 40)
    assert cat.hb_fan_in == 1
    assert len(followed) == FANIN
    assert [n for n, beats in followed.items() if beats] == ["m001"]  # the successor only
    monkeypatch.delenv(HB_FANIN_ENV)
    cat, followed = _choices(ctx, monkeypatch, 40)
    heard = {n for n, beats in followed.items() if beats}
    assert cat.hb_fan_in == HB_FANIN and len(followed) == FANIN
    assert heard == heard_members("m000", [f"m{i:03d}" for i in range(1, 41)], HB_FANIN)
    assert "m001" in heard


def test_a_full_mesh_hears_everyone_whatever_the_override(
        ctx: zmqg.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FANIN_ENV, raising=False)
    monkeypatch.setenv(HB_FANIN_ENV, "1")
    _, followed = _choices(ctx, monkeypatch, FANIN)
    assert len(followed) == FANIN and all(followed.values())
