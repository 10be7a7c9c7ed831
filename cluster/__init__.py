"""Ray cluster mode for `trapedge batch` (the cluster extra: pip install 'trapedge[cluster]')."""

from .pool import RayPool, ray_pool

__all__ = ["RayPool", "ray_pool"]
