"""``/metrics``: the coordinator's :class:`StatusBoard` in the Prometheus text format.

A custom collector reads the board at scrape time (no global registry, no per-event metric
objects), so a scrape costs a walk over a few dozen series plus one gauge per enterprise.
Every series is named ``secfed_*``; labels take small fixed sets of values (stage names,
:func:`abort_kind`, :func:`refusal_kind`) or enterprise ids from the roster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


def _by_label(name: str, documentation: str, label: str,
              counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter with one series per value of ``label`` (sorted), counted in ``counts``."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


class _BoardCollector(Collector):
    def __init__(self, board: StatusBoard):
        self._board = board

    def collect(self) -> Iterator[Metric]:
        b = self._board
        yield CounterMetricFamily("secfed_rounds_completed", "Rounds that ended with an agreed "
                                  "global hash.", value=b.completed)
        yield _by_label("secfed_rounds_aborted", "Rounds aborted, by reason.", "reason", b.aborted)
        yield from self._stages(b)
        yield _by_label("secfed_bytes_received", "Protocol message bytes accepted from sites.",
                        "stage", b.bytes_in)
        yield _by_label("secfed_bytes_sent", "Bytes served to sites (inboxes, aggregates).",
                        "stage", b.bytes_out)
        yield GaugeMetricFamily("secfed_enterprises_active", "Participants of the open round "
                                "still in it.", value=b.active())
        yield GaugeMetricFamily("secfed_enterprises", "Enterprises on the roster.",
                                value=len(b.enterprises))
        yield _by_label("secfed_refusals", "Messages refused by the coordinator and rounds "
                        "refused by a site's policy, by reason.", "reason", b.refusals)
        yield _by_label("secfed_site_refusals", "Rounds sites refused by their own policy "
                        "(signed refusals), by reason.", "reason", b.site_refusals)
        yield from self._heads(b)
        yield GaugeMetricFamily("secfed_current_round", "Number of the newest round opened "
                                "(0: none).", value=b.current or 0)

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
        yield _by_label("secfed_ledger_heads_seen", "Signed ledger heads accepted (with an upload "
                        "or a confirmation).", "stage", b.heads_seen)
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
