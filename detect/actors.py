"""The one kind of Ray actor raywatch keeps: named, detached, one per cluster, restarted when it dies.

The drift monitors, the Prometheus watcher and the shared rate limit are such actors. Ray is imported
when one is asked for, never at import time.
"""

from __future__ import annotations

from typing import Any


def named_actor(cls: type, name: str, namespace: str, *args: Any, **options: Any) -> Any:
    """The actor `name` in `namespace`, created from `cls(*args)` when missing (then it outlives its
    creator and restarts on failure). `options` are further Ray actor options (max_concurrency, ...)."""
    import ray  # deferred: importing this module starts nothing

    defaults = {"lifetime": "detached", "get_if_exists": True, "max_restarts": -1, "num_cpus": 0}
    return ray.remote(cls).options(name=name, namespace=namespace, **{**defaults, **options}).remote(*args)
