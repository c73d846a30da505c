"""Conventional NFS baseline: a real nfs-ganesha server and a libnfs client.

The scenario harness compares hpcflow against "all datasets live on NFS":
:class:`GaneshaServer` runs the server, :class:`NfsClient` moves arrays over
NFSv3 and counts the bytes.  Independent of the rest of hpcflow.
"""

from nfs_baseline.client import NfsClient
from nfs_baseline.server import GaneshaServer, NfsUnavailable, available, remove_stale

__all__ = ["GaneshaServer", "NfsClient", "NfsUnavailable", "available", "remove_stale"]
