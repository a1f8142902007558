"""The long-lived objects of Grizz's processes, kept out of the garbage collector's way.

Once Django is set up and the application imported, a process holds about 180,000 objects
tracked by the cyclic garbage collector (modules, classes, functions, settings, the openai
client's types) that live as long as the process. CPython's full (generation 2) collection
walks every one of them: 100-190 ms of a stopped event loop on the bench's host, which
every streaming reply of the process felt at once as a gap, and which was the p99 of the
bench's per-token latency from 100 conversations up (docs/performance.md). The collector
runs one whenever the objects that survived younger collections grow by a quarter of the
old ones, which a process streaming hundreds of replies reaches every few seconds.

`gc.freeze()` moves every object tracked so far into the permanent generation, which no
collection visits: a full collection then walks only what was made since. The frozen
objects were never going to be freed; what they point to stays alive as before.
"""

import gc


def heap_freeze() -> int:
    """Leave every object made so far out of all later collections; returns their count.
    Call once the process has imported and built what it keeps for its lifetime, before it
    serves anything."""
    gc.collect()  # what startup left as garbage is freed, not frozen for ever
    gc.freeze()
    return gc.get_freeze_count()
