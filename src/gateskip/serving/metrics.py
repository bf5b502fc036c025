"""The engine's counts on the server's /metrics.

vLLM's model runs in a worker process; its /metrics is served by the API server process.
The worker writes its report (EngineSkip.report) to a JSON file every `log_interval` seconds,
atomically; `gateskip serve` registers a Prometheus collector in the API server that reads
that file on each scrape. Standard library and prometheus_client only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREFIX = "gateskip_"


def write_report(path: str | os.PathLike, report: dict) -> None:
    """Replace the metrics file in one step: a scrape never reads half a report."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def read_report(path: str | os.PathLike) -> dict | None:
    """The last report written, or None before the first one."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class ReportCollector:
    """A Prometheus collector over the worker's metrics file."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        report = read_report(self.path) or {"target": 0.0, "tokens": 0, "skip_fraction": 0.0, "net_saving": 0.0,
                                            "net_saving_with_head": 0.0, "modules": {}}
        yield GaugeMetricFamily(PREFIX + "target", "Net FLOP saving target the engine runs at", report["target"])
        yield CounterMetricFamily(PREFIX + "tokens", "Tokens through the gated decoder layers", report["tokens"])
        yield GaugeMetricFamily(PREFIX + "skip_fraction", "Share of token x module evaluations skipped (the paper's "
                                "figure)", report["skip_fraction"])
        yield GaugeMetricFamily(PREFIX + "net_flop_saving", "Net FLOP saving of the decoder layers, gate cost "
                                "included", report["net_saving"])
        yield GaugeMetricFamily(PREFIX + "net_flop_saving_with_head", "Net FLOP saving with the LM head counted",
                                report["net_saving_with_head"])
        skipped = GaugeMetricFamily(PREFIX + "module_skip_fraction", "Share of tokens that skip a module",
                                    labels=["module"])
        for key, (seen, n_skipped) in report["modules"].items():
            skipped.add_metric([key], n_skipped / seen if seen else 0.0)
        yield skipped


def register_collector(path: str | os.PathLike) -> None:
    from prometheus_client import REGISTRY

    REGISTRY.register(ReportCollector(path))
