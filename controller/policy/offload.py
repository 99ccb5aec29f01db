"""Policy parsing, validation and compiling in a worker process, off the controller's loop.

A thread is not enough: parsing and checking a large policy is Python (and
libyaml under the GIL), and a thread that holds the GIL makes every other
coroutine of the loop wait for the interpreter's switch interval at each step —
a 700 kB policy then stalls /healthz for about as long as the parse takes. A
process of its own leaves the loop the whole interpreter.

`PolicyProcess.run(fn, *args)` runs a module-level function in one long-lived
worker (started on first use with the `spawn` method: a fresh interpreter, no
copy of the loop or its sockets) and awaits its result; the model is pickled to
it with each call, the result is pickled back (and unpickled in a thread, with the
garbage collector paused). `run_here` is the same interface
without a process (tests, the CLI).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tokenfabric.controller.gctools import gc_paused

log = logging.getLogger(__name__)


T = TypeVar("T")


async def run_here(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def _pickled_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """fn(*args), pickled here: the executor's own thread then only moves bytes."""
    return pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)


def _unpickle(data: bytes) -> Any:
    with gc_paused():  # a policy of thousands of tenants: see controller/gctools.py
        return pickle.loads(data)


PARENT_CHECK_S = 1.0  # how often the worker checks that the controller still runs


def _warm_up() -> None:
    """In the worker, once: exit with the controller, and import the policy code before
    the first real call needs it."""
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="policy-worker-parent").start()
    import tokenfabric.controller.policy.reload  # noqa: F401


def _exit_with_parent(parent: int) -> None:
    """A controller killed with SIGKILL (a replica's failover, docs/replicas.md) cannot
    shut its pool down, and the worker, blocked on its task queue, would live on as an
    orphan (and keep multiprocessing's resource tracker alive): it exits once its
    parent is gone (it is re-parented, so getppid() changes)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class PolicyProcess:
    """One worker process for CPU-heavy policy work; restarted if it dies."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_warm_up)
            return self._pool

    def start(self) -> None:
        """Start the worker now, so that the first policy call does not wait for it."""
        self._executor().submit(_warm_up)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._executor()
        try:
            data = await asyncio.wrap_future(pool.submit(_pickled_call, fn, args))
        except concurrent.futures.process.BrokenProcessPool:
            # The worker died (OOM killer, a signal): the next call gets a new one.
            log.warning("policy worker process died; starting a new one")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return await asyncio.to_thread(_unpickle, data)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
