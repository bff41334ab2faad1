"""One progress reporter for both loops: running totals, a log line every few seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stream_cps.logs import eta
from stream_cps.stitching.ingest import ApplyStats
from stream_cps.stitching.stitcher import BatchResult

log = logging.getLogger("stream_cps.service")

PROGRESS_EVERY = 10.0
WAITING_CAP = 1_000_000  # counting more would cost a noticeable share of a 10 s interval
# At most this share of the loop's time goes to counting what waits; between counts the line
# gives the last count less what was stitched since.
WAITING_SHARE = 0.02


@dataclass
class Progress:
    """Totals since the loop started; returned by the loop when it ends.

    The stitching fields are filled by both loops; the message fields only by the Kafka loop
    (and then appear in the log line), ``lag_bytes`` only by the replication loop.
    """

    events: int = 0
    created: int = 0
    merges: int = 0
    purged: int = 0
    rule_failures: int = 0
    erased: int = 0  # events of erased people that came back (messages or rows), dropped
    lag_bytes: int | None = None
    batches: int = 0
    messages: int = 0
    events_new: int = 0
    events_seen: int = 0
    changefeed_rows: int = 0
    deletes: int = 0
    resolved: int = 0
    ignored: int = 0
    dead_letters: int = 0
    replays_applied: int = 0
    last_resolved: str | None = None
    # events still waiting (a bounded count), asked only when a line is logged: with it the
    # line of a long job (a restitch of everything, a backlog) says how much is left and when
    # it should be done
    waiting: Callable[[], int] | None = None
    _last_log: float = field(default_factory=time.monotonic)
    _last_events: int = 0
    _last_messages: int = 0
    _counted: tuple[int, int] | None = None  # the last count, and ``events`` then
    _counted_at: float = 0.0
    _count_cost: float = 0.0

    def add(self, result: BatchResult) -> None:
        """A committed stitching batch."""
        self.events += result.events
        self.created += result.created
        self.merges += result.merges
        self.purged += len(result.purged)
        self.rule_failures += result.rule_failures
        self.erased += result.erased

    def add_ingest(self, stats: ApplyStats) -> None:
        """A committed ingest batch (Kafka or webhook messages), its stitching included."""
        self.batches += 1
        self.messages += stats.messages
        self.events_new += stats.events_new
        self.events_seen += stats.events_seen
        self.changefeed_rows += stats.changefeed_rows
        self.deletes += stats.deletes
        self.resolved += stats.resolved
        self.ignored += stats.tombstones + stats.unknown
        self.dead_letters += len(stats.dead_letters)
        self.erased += stats.erased
        self.last_resolved = stats.last_resolved or self.last_resolved
        self.add(stats.stitch)

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < PROGRESS_EVERY:
            return
        rate = (self.events - self._last_events) / max(now - self._last_log, 1e-9)
        line = (
            f"stitched {self.events} events ({rate:.0f}/s), {self.created} entities created, "
            f"{self.merges} merges, {self.purged} purged"
        )
        if self.erased:
            line += f", {self.erased} erased events dropped"

        # what ``waiting`` counts: messages on Kafka (a replay re-reads stitched ones), events
        done = self.messages - self._last_messages if self.messages else None
        work_rate = rate if done is None else done / max(now - self._last_log, 1e-9)
        if self.waiting is not None and work_rate > 0:
            left = self._left(now, self.waiting)
            if left:
                line += f", {left:,}{'+' if left >= WAITING_CAP else ''} waiting"
                line += f" (about {eta(left / work_rate)} at this rate)"
        if self.lag_bytes is not None:
            line += f", slot lag {self.lag_bytes} bytes"
        if self.messages:
            line += (
                f"; kafka: {self.messages} messages, {self.events_new} new events, "
                f"{self.events_seen} redelivered, {self.changefeed_rows} changefeed rows, "
                f"{self.deletes} deletes, {self.resolved} resolved, {self.ignored} ignored, "
                f"{self.dead_letters} dead letters"
            )
        log.info("%s", line)
        self._last_log, self._last_events = now, self.events
        self._last_messages = self.messages

    def _left(self, now: float, waiting: Callable[[], int]) -> int:
        """What waits: counted when the last count's cost allows (``WAITING_SHARE``), else
        the last count less the events stitched since (a capped count stays as it was).

        On the replication path the count walks the partial index of unstitched rows and
        its dead entries: 0.35-0.6 s at 1-2M events, every 10 s in a restitch of everything,
        was 3-5% of the stitching connection's time, in series with its batches."""
        due = max(PROGRESS_EVERY, self._count_cost / WAITING_SHARE)
        if self._counted is None or now - self._counted_at >= due:
            started = time.monotonic()
            count = waiting()
            self._count_cost = time.monotonic() - started
            self._counted, self._counted_at = (count, self.events), now
            return count
        count, events = self._counted
        return count if count >= WAITING_CAP else max(0, count - (self.events - events))
