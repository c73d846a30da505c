"""Typed configuration: TOML files, CLI overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcflow.config import NodeConfig
from hpcflow.errors import ConfigError


def test_toml_then_cli_overrides(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text('name = "n9"\ndata_dir = "/tmp/x"\nlisten = "127.0.0.1:7400"\n'
                 'peers = ["127.0.0.1:7101"]\nheartbeat_s = 0.5\n')
    cfg = NodeConfig.load(f, {"listen": "127.0.0.1:7500", "peers": []})
    assert cfg.name == "n9" and cfg.heartbeat_s == 0.5
    assert cfg.rpc_endpoint == "tcp://127.0.0.1:7500"
    assert cfg.pub_endpoint == "tcp://127.0.0.1:7501"
    assert cfg.bulk_endpoint == "tcp://127.0.0.1:7502"
    assert cfg.peer_endpoints == ["tcp://127.0.0.1:7101"]


def test_ipc_and_ephemeral_endpoints(tmp_path: Path) -> None:
    cfg = NodeConfig(data_dir=tmp_path, listen="ipc:///tmp/hf.sock")
    assert cfg.pub_endpoint == "ipc:///tmp/hf.sock.pub"
    assert NodeConfig(data_dir=tmp_path, listen="127.0.0.1:0").bulk_endpoint.endswith(":0")


@pytest.mark.parametrize("text,match", [
    ('data_dir = "x"\nbogus = 1\n', "unknown key.*bogus"),
    ('data_dir = "x"\nheartbeat_s = "fast"\n', "heartbeat_s must be"),
    ('data_dir = "x"\npeers = "127.0.0.1:1"\n', "peers must be"),
    ('data_dir = "x"\ncatalog = "magic"\n', "catalog must be one of"),
    ("data_dir = \n", "invalid TOML"),
    ('listen = "127.0.0.1:1"\n', "data_dir is required"),
    ('data_dir = "x"\nlisten = "nohostport"\n', "not HOST:PORT"),
    ('data_dir = "x"\nttl_s = 0.5\n', "ttl_s > heartbeat_s"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        NodeConfig.load(f, {})


@pytest.mark.parametrize("field", ["heartbeat_s", "ttl_s", "rpc_timeout_s",
                                   "transfer_timeout_s", "link_gbit", "forget_dead_s",
                                   "fault_write_delay_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0])
def test_numbers_must_be_finite_and_in_range(tmp_path: Path, field: str, value: float) -> None:
    """NaN passes every comparison it fails: `--heartbeat nan` flooded heartbeats,
    `--ttl nan` never expired a peer, `link_gbit = 0` divided by zero in every plan."""
    if field == "fault_write_delay_s" and value == 0.0:
        return  # no delay is the default
    with pytest.raises(ConfigError, match=field):
        NodeConfig(data_dir=tmp_path, **{field: value})


def test_the_cli_refuses_a_nan_heartbeat_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hpcflow", "node", "--data-dir", str(tmp_path),
                        "--heartbeat", "nan"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "heartbeat_s" in r.stderr and "Traceback" not in r.stderr, r.stderr
