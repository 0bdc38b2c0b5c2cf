"""A local Ray cluster that listens on loopback only.

Ray 2.60 decides where a cluster started from this process listens once, when `ray` is
first imported: `ray._private.ray_constants.ENABLE_RAY_CLUSTER` reads
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER then. At "0", the node's address is 127.0.0.1 and
every socket of the cluster (GCS, raylet, the driver, every actor, the dashboard and its
agents) listens there; otherwise most of them listen on every interface or the machine's
external address (measured: 11 of 13 listeners). Setting the variable after the import
changes nothing, and neither does `ray.init(_node_ip_address="127.0.0.1")` (Ray swaps a
loopback address for the external one).

So the CLI calls `prepare` before anything imports Ray when it will start its own
cluster, and `cluster.connect` turns Ray's token auth off only when `guaranteed` says
the cluster can be reached from this machine alone. Joining a cluster (--address,
$RAY_ADDRESS) sets nothing: that cluster keeps its own settings. This module must not
import Ray at load.
"""
from __future__ import annotations

import os

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # read by Ray at import (see above)
    "RAY_USAGE_STATS_ENABLED": "0",
}


def starts_local_cluster(address: str | None) -> bool:
    """Whether connecting with `address` starts a cluster rather than joining one."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def prepare() -> None:
    """Ask for loopback in this process's environment (a value the user set is kept);
    Ray's processes inherit it. Effective in this process only before `import ray`."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def guaranteed() -> bool:
    """Whether a cluster started from this process listens on loopback only: the choice
    the imported Ray made (an unknown Ray counts as not guaranteed)."""
    from ray._private import ray_constants

    return getattr(ray_constants, "ENABLE_RAY_CLUSTER", True) is False
