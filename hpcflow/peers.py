"""Where a node's peers come from on a batch allocation: SLURM's node list or a file.

``hpcflow node --peers-from slurm`` (``peers_from = "slurm"``) reads the hosts of
the job from ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST`` in older SLURM), a compact
host list such as ``node[001-004,010],gpu7``, expanded here (or by ``scontrol show
hostnames`` when that command exists, as it does on SLURM hosts).  Every node of the
job listens on the same port (one port convention), so a host name is enough to
reach it.  ``--peers-file PATH`` reads the same from a file a job script wrote: one
``HOST`` or ``HOST:PORT`` (or ``tcp://...``) per line, ``#`` comments.

A node joins through at most :data:`JOIN_THROUGH` of the hosts (the first of the
list, which every node shares, and the next two after its own in list order), never
itself; gossip does the rest.  That graph stays connected when any one host is
missing, and N nodes starting at once make 3N hellos, not N².
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

#: Hosts at most in one expanded list (a typo such as ``n[0-99999999]`` is an error).
MAX_HOSTS = 65_536
#: Peers a node joins through (see the module docstring).
JOIN_THROUGH = 3
#: Biggest peers file read.
MAX_PEERS_FILE_BYTES = 4 * 1024 * 1024
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}$")


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"host list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ConfigError(f"host list {text!r}: unbalanced '['")
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _range(spec: str, whole: str) -> list[str]:
    """``001-004`` -> 001 002 003 004 (zero padding kept); ``7`` -> 7."""
    lo, sep, hi = spec.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ConfigError(f"host list {whole!r}: {spec!r} is not N or N-M")
    if not sep:
        return [lo]
    a, b = int(lo), int(hi)
    if b < a:
        raise ConfigError(f"host list {whole!r}: range {spec!r} runs backwards")
    if b - a >= MAX_HOSTS:
        raise ConfigError(f"host list {whole!r}: more than {MAX_HOSTS} hosts")
    width = len(lo) if lo.startswith("0") else 0
    return [str(i).zfill(width) for i in range(a, b + 1)]


def expand_hostlist(text: str) -> list[str]:
    """Expand SLURM's compact host list: ``node[001-003,010],io[1-2]-ib,login`` ->
    ``node001 node002 node003 node010 io1-ib io2-ib login``; several bracket groups in
    one name (``r[1-2]n[1-2]``) give their product.  Order is kept, repeats dropped."""
    hosts: list[str] = []
    seen: set[str] = set()
    for item in _split_top(text):
        names = [""]
        pos = 0
        for m in re.finditer(r"\[([^\[\]]*)\]", item):
            prefix = item[pos:m.start()]
            choices = [v for spec in m.group(1).split(",") if spec.strip()
                       for v in _range(spec.strip(), text)]
            if not choices:
                raise ConfigError(f"host list {text!r}: empty brackets")
            names = [n + prefix + c for n in names for c in choices]
            if len(names) > MAX_HOSTS:
                raise ConfigError(f"host list {text!r}: more than {MAX_HOSTS} hosts")
            pos = m.end()
        names = [n + item[pos:] for n in names]
        for n in names:
            if "[" in n or "]" in n or not _HOST.match(n):
                raise ConfigError(f"host list {text!r}: {n!r} is not a host name")
            if n not in seen:
                seen.add(n)
                hosts.append(n)
        if len(hosts) > MAX_HOSTS:
            raise ConfigError(f"host list {text!r}: more than {MAX_HOSTS} hosts")
    return hosts


def slurm_hosts(env: Mapping[str, str] | None = None) -> list[str]:
    """The job's hosts, in SLURM's order.  ``scontrol show hostnames`` when it exists
    (it knows every syntax SLURM does); otherwise :func:`expand_hostlist`."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("--peers-from slurm: SLURM_JOB_NODELIST is not set (run the node "
                          "with srun inside an allocation, or use --peers-file)")
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout
            hosts = list(dict.fromkeys(h.strip() for h in out.split() if h.strip()))
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to our own expansion
    return expand_hostlist(nodelist)


def this_host(env: Mapping[str, str] | None = None) -> str:
    """This node's host name as the allocation names it: ``SLURMD_NODENAME`` (set by
    srun in every task), else the short host name."""
    env = os.environ if env is None else env
    return env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def read_peers_file(path: str | os.PathLike[str]) -> list[str]:
    """Entries of a peers file: ``HOST``, ``HOST:PORT`` or ``tcp://HOST:PORT`` per line."""
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > MAX_PEERS_FILE_BYTES:
            raise ConfigError(f"peers file {p} is larger than {MAX_PEERS_FILE_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read peers file {p}: {exc}") from exc
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host = line[len("tcp://"):] if line.startswith("tcp://") else line
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if not _HOST.match(host) or "[" in host:
            raise ConfigError(f"peers file {p}, line {n}: {line!r} is not HOST or HOST:PORT")
        entries.append(line)
        if len(entries) > MAX_HOSTS:
            raise ConfigError(f"peers file {p}: more than {MAX_HOSTS} entries")
    return entries


def _host_port(entry: str, port: int) -> tuple[str, int]:
    e = entry[len("tcp://"):] if entry.startswith("tcp://") else entry
    host, sep, p = e.rpartition(":")
    if sep and p.isdigit() and host:
        return host, int(p)
    return e, port


def select_peers(entries: list[str], me: set[str], port: int,
                 my_port: int | None = None) -> list[str]:
    """``HOST:PORT`` endpoints to join through: the list's first host and the two after
    this node's own entry (see the module docstring), never this node itself (an entry
    whose host is in ``me`` and whose port is ours)."""
    pairs = list(dict.fromkeys(_host_port(e, port) for e in entries))
    own_port = port if my_port is None else my_port
    mine = [i for i, (h, p) in enumerate(pairs) if h in me and p == own_port]
    i = mine[0] if mine else -1
    others = [k for k in range(len(pairs)) if k not in mine]
    if not others:
        return []
    picks = [others[0]]
    n = len(pairs)
    for step in range(1, n):
        if len(picks) >= JOIN_THROUGH:
            break
        k = (i + step) % n
        if k in others and k not in picks:
            picks.append(k)
    return [f"{pairs[k][0]}:{pairs[k][1]}" for k in picks]


__all__ = ["expand_hostlist", "read_peers_file", "select_peers", "slurm_hosts", "this_host"]
