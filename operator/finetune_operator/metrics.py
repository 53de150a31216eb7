"""Prometheus metrics of the operator, served on `FT_METRICS_PORT` (default 9090, `off` disables).

- `finetune_operator_jobs{phase}`: FineTuneJobs this operator currently sees, by phase.
- `finetune_operator_reconcile_duration_seconds`: time of one reconcile pass (histogram).
- `finetune_operator_reconcile_errors_total{reason}`: failed passes, by cause (api, report, ...).
- `finetune_operator_phase_transitions_total{phase}`: phase changes, by the phase entered.
- `finetune_operator_children_total{action}`: children created, adopted, or refused as foreign.
- `finetune_operator_status_writes_total`: status patches (written only when the status changed).

The job gauge is rebuilt from the operator's own view (`observe_phase` per refresh, `forget` on
deletion), so after a restart it reflects the jobs as they are, not a running sum.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from finetune_operator.status import PHASES

DEFAULT_PORT = 9090
ENV_PORT = "FT_METRICS_PORT"


class Metrics:
    """The operator's metrics in one registry (a fresh registry per instance keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:
            registry = CollectorRegistry()
            # The usual process_* and python_* series, as in the default registry.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.jobs = Gauge(
            "finetune_operator_jobs", "FineTuneJobs seen by this operator, by phase.", ["phase"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "finetune_operator_reconcile_duration_seconds",
            "Duration of one reconcile pass of a FineTuneJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "finetune_operator_reconcile_errors",
            "Reconcile passes that failed, by cause.",
            ["reason"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "finetune_operator_phase_transitions",
            "Phase transitions of FineTuneJobs, by the phase entered.",
            ["phase"],
            registry=self.registry,
        )
        self.children = Counter(
            "finetune_operator_children",
            "Child objects created, adopted, or refused because another controller owns them.",
            ["action"],
            registry=self.registry,
        )
        self.status_writes = Counter(
            "finetune_operator_status_writes", "Status patches written.", registry=self.registry
        )
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def observe_phase(self, uid: str, phase: str | None) -> None:
        """Record the current phase of one FineTuneJob (None: no phase yet).

        Constant time: only the two gauge series the job leaves and enters change (re-counting every
        job here made each reconcile pass O(jobs), a refresh cycle O(jobs^2)).
        """
        with self._lock:
            old = self._phases.pop(uid, None) if phase is None else self._phases.get(uid)
            if phase is not None:
                self._phases[uid] = phase
            if old == phase:
                return
            if old is not None:
                self.jobs.labels(phase=old).dec()
            if phase is not None:
                self.jobs.labels(phase=phase).inc()

    def forget(self, uid: str) -> None:
        """The FineTuneJob is gone."""
        self.observe_phase(uid, None)


def port_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The metrics port from `FT_METRICS_PORT`: unset -> 9090, `off`/`false`/`-1` -> None (disabled),
    `0` -> any free port (tests)."""
    env = os.environ if env is None else env
    raw = (env.get(ENV_PORT) or "").strip().lower()
    if raw == "":
        return DEFAULT_PORT
    if raw in ("off", "false", "no", "-1", "disabled"):
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PORT}={raw!r} is not valid; expected a port number (0-65535) or 'off'") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{ENV_PORT}={raw!r} is not valid; expected a port number (0-65535) or 'off'")
    return port


class MetricsServer:
    """The HTTP endpoint serving one Metrics registry; `close()` frees the port (operator cleanup)."""

    def __init__(self, metrics: Metrics, port: int, addr: str = "0.0.0.0"):
        self._server: Any
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=addr, registry=metrics.registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(metrics: Metrics, port: int | None) -> MetricsServer | None:
    """Serve `metrics` on `port` (None: do not serve). Startup hook of the operator."""
    if port is None:
        return None
    return MetricsServer(metrics, port)


