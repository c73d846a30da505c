"""Prometheus metrics of a node (``--metrics HOST:PORT``, HTTP ``/metrics``).

Nothing is counted for the endpoint's sake: a custom collector reads, at scrape
time, the counters the node keeps anyway (its traffic per peer, the catalog, the
store) and the worker's :class:`~hpcflow.daemon.events.Events`.  The HTTP server is
gevent's WSGI server on the node's own loop (``prometheus_client.start_http_server``
would serve from a thread that reads the node's state while greenlets change it);
each request is a greenlet, at most :data:`MAX_SCRAPES` at once, and a scrape is a
few dictionary walks, so a slow or hostile scraper never holds up heartbeats.

Families (Prometheus naming: base units, ``_total`` on counters; the README lists
them with their meaning): ``hpcflow_transfer_{sent,received}_bytes_total{peer}``,
``hpcflow_transfer_chunk_retries_total``, ``hpcflow_ops_{run,failed}_total{op}``,
``hpcflow_{op,planning}_duration_seconds`` and ``hpcflow_step_duration_seconds{phase}``
(histograms), ``hpcflow_catalog_entries``, ``hpcflow_members{state}``,
``hpcflow_bulk_transfers_in_flight{direction}``, ``hpcflow_store_bytes``,
``hpcflow_store_datasets``, ``hpcflow_store_memory_bytes``,
``hpcflow_active_operations``, ``hpcflow_node_info{node,version}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import gevent.pool
import gevent.pywsgi
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .._version import __version__
from ..config import normalize_endpoint
from ..errors import ConfigError
from .events import Events
from .parts import ServedNode

log = logging.getLogger("hpcflow.metrics")

#: Scrapes served at once; more wait for a free slot (their sockets stay open).
MAX_SCRAPES = 8


class NodeCollector:
    """Reads a node's counters at scrape time (``prometheus_client``'s collector API)."""

    def __init__(self, node: ServedNode, events: Events,
                 uploads_in_flight: Callable[[], int]) -> None:
        self.node, self.events, self.uploads_in_flight = node, events, uploads_in_flight

    def collect(self) -> Iterator[Metric]:
        n, ev = self.node, self.events
        t = n.traffic
        for attr, what in (("bytes_sent", "sent"), ("bytes_received", "received")):
            fam = CounterMetricFamily(f"hpcflow_transfer_{what}_bytes",
                                      f"Dataset bytes {what}, per peer node", labels=["peer"])
            for peer, nbytes in sorted(getattr(t, attr).items()):
                fam.add_metric([peer], nbytes)
            yield fam
        yield CounterMetricFamily("hpcflow_transfer_chunk_retries",
                                  "Chunks re-requested after a failed digest",
                                  value=t.chunk_retries)
        for counter, name, text in ((ev.ops_run, "run", "Op units run here that succeeded"),
                                    (ev.ops_failed, "failed", "Op units run here that failed")):
            fam = CounterMetricFamily(f"hpcflow_ops_{name}", text, labels=["op"])
            for op, count in sorted(counter.items()):
                fam.add_metric([op], count)
            yield fam
        fam = CounterMetricFamily("hpcflow_streamed",
                                  "Rowwise units run block by block as their rows landed: "
                                  "units, blocks, and blocks computed while pulls still ran",
                                  labels=["what"])
        for what in ("units", "blocks", "early_blocks"):
            fam.add_metric([what], ev.streamed[what])
        yield fam
        h = HistogramMetricFamily("hpcflow_op_duration_seconds",
                                  "Seconds of one op unit (inputs local, compute, store)")
        h.add_metric([], ev.op_seconds.cumulative(), ev.op_seconds.total)
        yield h
        h = HistogramMetricFamily("hpcflow_planning_duration_seconds",
                                  "Seconds to get a plan as initiator (cached plans too)")
        h.add_metric([], ev.planning.cumulative(), ev.planning.total)
        yield h
        h = HistogramMetricFamily("hpcflow_step_duration_seconds",
                                  "Seconds of a share's step on this node, by phase",
                                  labels=["phase"])
        for phase, hist in sorted(ev.steps.items()):
            h.add_metric([phase], hist.cumulative(), hist.total)
        yield h
        yield GaugeMetricFamily("hpcflow_catalog_entries",
                                "Dataset parts the catalog lists on live nodes",
                                value=len(n.catalog.records()))
        views = n.catalog.nodes()
        g = GaugeMetricFamily("hpcflow_members", "Cluster members by state (self included)",
                              labels=["state"])
        g.add_metric(["alive"], sum(1 for v in views if v.alive))
        g.add_metric(["dead"], sum(1 for v in views if not v.alive))
        yield g
        g = GaugeMetricFamily("hpcflow_bulk_transfers_in_flight",
                              "Bulk uploads being received and pulls being made",
                              labels=["direction"])
        g.add_metric(["upload"], self.uploads_in_flight())
        g.add_metric(["pull"], ev.pulls_in_flight)
        yield g
        records = n.store.records()
        yield GaugeMetricFamily("hpcflow_store_bytes", "Bytes of the parts this node holds",
                                value=sum(r.nbytes for r in records))
        yield GaugeMetricFamily("hpcflow_store_datasets", "Dataset parts this node holds",
                                value=len(records))
        yield GaugeMetricFamily("hpcflow_store_memory_bytes",
                                "Bytes of intermediates held in memory",
                                value=n.store.stats()["memory_used"])
        yield GaugeMetricFamily("hpcflow_active_operations",
                                "Ops running or queued and transfers (the planner's load)",
                                value=n.load()["active"])
        g = GaugeMetricFamily("hpcflow_node_info", "This node", labels=["node", "version"])
        g.add_metric([n.name, __version__], 1)
        yield g


class MetricsServer:
    """``/metrics`` over HTTP on the node's gevent loop."""

    def __init__(self, address: str, collector: NodeCollector) -> None:
        host, _, port = normalize_endpoint(address)[len("tcp://"):].rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.server = gevent.pywsgi.WSGIServer(
            (host.strip("[]"), int(port)), make_wsgi_app(self.registry),
            spawn=gevent.pool.Pool(MAX_SCRAPES), log=None, error_log=log)
        try:
            self.server.init_socket()
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc}") from exc
        bound = self.server.address
        self.url = f"http://{host}:{bound[1]}/metrics"

    def start(self) -> None:
        self.server.start()
        log.info("metrics at %s", self.url)

    def stop(self) -> None:
        self.server.stop(timeout=1)


__all__ = ["MetricsServer", "NodeCollector"]
