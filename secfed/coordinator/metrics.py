"""``/metrics``: the coordinator's :class:`StatusBoard` in the Prometheus text format.

A custom collector reads the board at scrape time (no global registry, no per-event metric
objects), so a scrape costs a walk over a few dozen series plus one gauge per enterprise.
Every series is named ``secfed_*``; labels take small fixed sets of values (stage names,
:func:`abort_kind`, :func:`refusal_kind`) or enterprise ids from the roster.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from secfed.coordinator.status import STAGE_BUCKETS, StatusBoard

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _BoardCollector(Collector):
    def __init__(self, board: StatusBoard):
        self._board = board

    def collect(self) -> Iterator[Metric]:
        b = self._board
        done = CounterMetricFamily("secfed_rounds_completed", "Rounds that ended with an agreed "
                                   "global hash.")
        done.add_metric([], b.completed)
        yield done
        aborted = CounterMetricFamily("secfed_rounds_aborted", "Rounds aborted, by reason.",
                                      labels=["reason"])
        for reason, n in sorted(b.aborted.items()):
            aborted.add_metric([reason], n)
        yield aborted
        yield from self._stages(b)
        for name, what, counts in (
            ("secfed_bytes_received", "Protocol message bytes accepted from sites.", b.bytes_in),
            ("secfed_bytes_sent", "Bytes served to sites (inboxes, aggregates).", b.bytes_out),
        ):
            fam = CounterMetricFamily(name, what, labels=["stage"])
            for stage, n in sorted(counts.items()):
                fam.add_metric([stage], n)
            yield fam
        active = GaugeMetricFamily("secfed_enterprises_active", "Participants of the open round "
                                   "still in it.")
        active.add_metric([], b.active())
        yield active
        roster = GaugeMetricFamily("secfed_enterprises", "Enterprises on the roster.")
        roster.add_metric([], len(b.enterprises))
        yield roster
        refusals = CounterMetricFamily("secfed_refusals", "Messages refused by the coordinator "
                                       "and rounds refused by a site's policy, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(b.refusals.items()):
            refusals.add_metric([reason], n)
        yield refusals
        by_site = CounterMetricFamily("secfed_site_refusals", "Rounds sites refused by their own "
                                      "policy (signed refusals), by reason.", labels=["reason"])
        for reason, n in sorted(b.site_refusals.items()):
            by_site.add_metric([reason], n)
        yield by_site
        yield from self._heads(b)
        current = GaugeMetricFamily("secfed_current_round", "Number of the newest round opened "
                                    "(0: none).")
        current.add_metric([], b.current or 0)
        yield current

    @staticmethod
    def _stages(b: StatusBoard) -> Iterator[Metric]:
        hist = HistogramMetricFamily("secfed_stage_duration_seconds", "Time from a stage's "
                                     "opening to its close.", labels=["stage"])
        for stage, counts in sorted(b.stage_hist.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*STAGE_BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric([stage], buckets, b.stage_sum[stage])
        yield hist

    @staticmethod
    def _heads(b: StatusBoard) -> Iterator[Metric]:
        seen = CounterMetricFamily("secfed_ledger_heads_seen", "Signed ledger heads accepted "
                                   "(with an upload or a confirmation).", labels=["stage"])
        for stage, n in sorted(b.heads_seen.items()):
            seen.add_metric([stage], n)
        yield seen
        index = GaugeMetricFamily("secfed_ledger_head_index", "Newest accepted ledger-head "
                                  "index per enterprise.", labels=["enterprise"])
        eps = GaugeMetricFamily("secfed_enterprise_epsilon", "RDP epsilon attested by accepted "
                                "upload heads per enterprise.", labels=["enterprise"])
        for e in b.enterprises.values():
            index.add_metric([e.id], e.head_index)
            eps.add_metric([e.id], e.epsilon)
        yield index
        yield eps


class Metrics:
    """A registry holding only the board's collector; :meth:`render` is one scrape."""

    def __init__(self, board: StatusBoard):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_BoardCollector(board))

    def render(self) -> bytes:
        return generate_latest(self.registry)
