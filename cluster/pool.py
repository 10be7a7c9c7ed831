"""A pool of Ray actors, each holding one loaded pipeline; Ray restarts a killed actor and retries its call."""

from __future__ import annotations

from typing import Any, Optional

import ray

from trapedge.runtime.season.worker import ChunkWorker

__all__ = ["GPU_DEVICES", "RayPool", "ray_pool"]

GPU_DEVICES = ("cuda", "tensorrt")


class RayPool:
    """`workers` ChunkWorker actors (one GPU each for cuda/tensorrt); restarts and call retries are Ray's."""

    def __init__(self, settings: dict, workers: int, *, max_restarts: int = -1, env: Optional[dict] = None) -> None:
        gpu = settings.get("device") in GPU_DEVICES
        options = {"max_restarts": max_restarts, "max_task_retries": -1, "num_cpus": 1, "num_gpus": 1 if gpu else 0}
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = ray.remote(ChunkWorker).options(**options)
        self.actors = [actor.remote(settings) for _ in range(workers)]
        self.idle = list(self.actors)
        self.running: dict[Any, tuple[int, Any]] = {}
        self.count = 0

    def free(self) -> int:
        """Idle actors."""
        return len(self.idle)

    def submit(self, method: str, job: Any) -> int:
        """Calls one idle actor; returns the call's token."""
        actor = self.idle.pop()
        self.count += 1
        self.running[getattr(actor, method).remote(job)] = (self.count, actor)
        return self.count

    def results(self) -> list[tuple[int, Any, Optional[BaseException]]]:
        """Waits for at least one call to end; a failed call comes back as its cause (the card fails alone)."""
        ready, _ = ray.wait(list(self.running), num_returns=1)
        outcomes = []
        for ref in ready:
            token, actor = self.running.pop(ref)
            self.idle.append(actor)
            try:
                outcomes.append((token, ray.get(ref), None))
            except ray.exceptions.RayTaskError as e:
                outcomes.append((token, None, e.cause if isinstance(e.cause, BaseException) else e))
            except ray.exceptions.RayError as e:
                outcomes.append((token, None, e))
        return outcomes

    def pids(self) -> list[int]:
        """The actors' process ids (tests kill one with them)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Ends the actors (the cluster stays)."""
        for actor in self.actors:
            ray.kill(actor)


def ray_pool(address: str, settings: dict, workers: Optional[int] = None) -> RayPool:
    """Connects to the cluster (ray://HOST:PORT, auto, or local) and sizes the pool to its GPUs or CPUs."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = ray.cluster_resources()
    key = "GPU" if settings.get("device") in GPU_DEVICES else "CPU"
    count = workers or max(1, int(resources.get(key, 1)))
    return RayPool(settings, count)
