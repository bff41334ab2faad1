"""The garbage collector's settings for ``stream-cps run`` (either source).

Almost everything a batch allocates is freed by reference counting the moment the batch is
done; the cyclic collector is only needed for the rare cycle. With CPython's default thresholds
(700, 10, 10) it ran about 3,500 times during a 200,000-event burst (``bench/stitch.py``).
Each time it found the batch in flight (its events, identifier tuples, lookup rows, plan
components: tens of thousands of objects) still alive, promoted it and walked it again in the
older generations: 3.5-5.4 s of collector time in a 23-33 s burst, with the GIL held, against none
with the settings here (docs/benchmarks.md, "Seventh session").

So the young generation is collected only once 200,000 more container objects are alive than
at the last collection, far above one batch's working set, and what exists once the process
is built (modules, classes, settings) is moved out of the collector's view (``gc.freeze``):
the older generations, which are rarely collected now, stay small. What this holds back is
cyclic garbage only (reference counting frees the rest at once): up to about 200,000 young
container objects and whatever they reference, and what was promoted before it died waits for
an older collection. Python 3.11 (the image's) is what was measured.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 200_000


def tune() -> None:
    """Apply the settings above; call once, when the process is built and before its loops."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
