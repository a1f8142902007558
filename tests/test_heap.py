"""grizz/heap.py: what a process made at startup is left out of the collector's full
collections (each stopped every streaming reply of the process for 100-200 ms). The web
server's use of it is tested in tests/test_server.py."""

import gc
import weakref

from grizz.heap import heap_freeze


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def _tracked(obj: object) -> bool:
    return any(tracked is obj for tracked in gc.get_objects())


def test_it_leaves_what_was_made_before_out_of_later_collections() -> None:
    kept, garbage = Node(), Node()
    garbage_ref = weakref.ref(garbage)
    del garbage
    try:
        heap_freeze()
        assert garbage_ref() is None  # startup's garbage is freed, not frozen for ever
        assert not _tracked(kept)
        made_after = Node()
        assert _tracked(made_after)
    finally:
        gc.unfreeze()
    assert _tracked(kept)
