"""Local worker pools for `trapedge batch`: in this process (one after another) or one process per worker."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Optional, Protocol

from .worker import ChunkWorker

__all__ = ["InlinePool", "Pool", "ProcessPool", "local_pool"]

Outcome = tuple[int, Any, Optional[BaseException]]


class Pool(Protocol):
    """What the batch driver needs of a pool: free slots, submit a worker call, collect finished calls."""

    def free(self) -> int: ...
    def submit(self, method: str, job: Any) -> int: ...
    def results(self) -> list[Outcome]: ...
    def close(self) -> None: ...


class InlinePool:
    """One worker in this process: jobs run one after another when results are collected."""

    def __init__(self, settings: dict) -> None:
        self.worker = ChunkWorker(settings)
        self.queue: list[tuple[int, str, Any]] = []
        self.count = 0

    def free(self) -> int:
        """1 when idle."""
        return 0 if self.queue else 1

    def submit(self, method: str, job: Any) -> int:
        """Queues one call; returns its token."""
        self.count += 1
        self.queue.append((self.count, method, job))
        return self.count

    def results(self) -> list[Outcome]:
        """Runs the queued call and returns its outcome."""
        token, method, job = self.queue.pop(0)
        try:
            return [(token, getattr(self.worker, method)(job), None)]
        except Exception as e:  # noqa: BLE001 - the card fails alone, with its reason
            return [(token, None, e)]

    def close(self) -> None:
        """Nothing to release."""


_WORKER: Optional[ChunkWorker] = None


def _start(settings: dict) -> None:
    global _WORKER
    _WORKER = ChunkWorker(settings)


def _call(method: str, job: Any) -> Any:
    return getattr(_WORKER, method)(job)


class ProcessPool:
    """`workers` processes, each holding its own loaded pipelines (spawned, so no session is forked)."""

    def __init__(self, settings: dict, workers: int) -> None:
        self.workers = workers
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start, initargs=(settings,))
        self.running: dict[Future, int] = {}
        self.count = 0

    def free(self) -> int:
        """Idle workers."""
        return self.workers - len(self.running)

    def submit(self, method: str, job: Any) -> int:
        """Starts one call in a worker process; returns its token."""
        self.count += 1
        self.running[self.executor.submit(_call, method, job)] = self.count
        return self.count

    def results(self) -> list[Outcome]:
        """Waits for at least one call to end and returns every ended call's outcome."""
        done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
        outcomes = []
        for future in done:
            token = self.running.pop(future)
            error = future.exception()
            outcomes.append((token, None if error else future.result(), error))
        return outcomes

    def close(self) -> None:
        """Stops the worker processes."""
        self.executor.shutdown(cancel_futures=True)


def local_pool(settings: dict, workers: int) -> Pool:
    """In this process for one worker, else a process per worker."""
    return InlinePool(settings) if workers <= 1 else ProcessPool(settings, workers)
