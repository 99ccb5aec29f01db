"""The cyclic garbage collector around the controller's large, long-lived structures.

A policy of thousands of tenants is hundreds of thousands of objects, all alive
until the next policy. Building it lets the collector run full passes over
everything alive (50-90 ms each with the GIL held: the event loop stops), and each
later pass walks it all again. So: build large structures with collection paused
(`gc_paused`), then `keep()` them out of later passes (gc.freeze: the objects alive
now are no longer scanned; freeing by reference count works as before, only a
reference cycle among them would never be collected).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside: what is built here stays alive (nothing to find),
    and each collection would walk all of it again (3x a large policy's load time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def keep() -> None:
    """What is alive now is long-lived: leave it out of every later collection."""
    gc.freeze()
