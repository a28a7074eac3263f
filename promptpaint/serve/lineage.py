"""Lineage of a deployment: one Comet experiment per ingress replica (offline archive by default), with request
and error counts by endpoint and status, latency percentiles and histograms, and 1 request in N sampled with its
images.

The ASGI middleware records every response here (``METRICS``, this module's, imported by reference in the
replica); the ingress flushes it to Comet at most every ``lineage.metrics_every_s`` seconds.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

log = logging.getLogger("promptpaint.serve")


class ServeMetrics:
    """Counts and latencies of the responses this process sent (thread-safe; bounded memory)."""

    def __init__(self, keep: int = 10_000):
        self.lock = threading.Lock()
        self.keep = keep
        self.counts: Counter[str] = Counter()  # "<endpoint>.<status>" and "requests", "errors_4xx", "errors_5xx"
        self.pending: dict[str, list[float]] = defaultdict(list)  # endpoint -> latencies (ms) since the last flush
        self.served = 0

    def record(self, path: str, status: int, ms: float) -> None:
        endpoint = path.strip("/").replace("/", "_") or "index"
        with self.lock:
            self.counts["requests"] += 1
            self.counts[f"{endpoint}.{status}"] += 1
            if 400 <= status < 500:
                self.counts["errors_4xx"] += 1
            elif status >= 500:
                self.counts["errors_5xx"] += 1
            lat = self.pending[endpoint]
            if len(lat) < self.keep:
                lat.append(ms)

    def take(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(cumulative counts, latencies since the last take) and resets the latencies."""
        with self.lock:
            counts = {f"count.{k}": float(v) for k, v in self.counts.items()}
            pending, self.pending = dict(self.pending), defaultdict(list)
        return counts, pending


METRICS = ServeMetrics()


class ServeLineage:
    """The Comet side of a deployment: wraps ``promptpaint.lineage.Lineage`` (same modes, same fallbacks)."""

    def __init__(self, spec: Any, name: str):
        from promptpaint.lineage import Lineage

        self.spec = spec
        self.lin = Lineage.start(spec, name)
        self.step = 0
        self.seen = 0
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.lin.exp is not None:
            self._thread = threading.Thread(target=self._loop, name="promptpaint-serve-lineage", daemon=True)
            self._thread.start()

    @property
    def key(self) -> str:
        return self.lin.key

    def _loop(self) -> None:
        every = max(1.0, float(self.spec.lineage.metrics_every_s))
        while not self._stop.wait(every):
            self.flush()

    def flush(self) -> None:
        counts, pending = METRICS.take()
        if not counts:
            return
        self.step += 1
        metrics = dict(counts)
        for endpoint, lat in pending.items():
            if lat:
                a = np.asarray(lat)
                metrics.update({f"latency_ms.{endpoint}.p50": float(np.percentile(a, 50)),
                                f"latency_ms.{endpoint}.p99": float(np.percentile(a, 99))})  # fmt: skip
        self.lin._safe(lambda: self.lin.exp.log_metrics(metrics, step=self.step))
        for endpoint, lat in pending.items():
            if lat:
                self.lin._safe(
                    lambda e=endpoint, v=lat: self.lin.exp.log_histogram_3d(v, name=f"latency_ms.{e}", step=self.step)
                )

    def sample(self, endpoint: str, images: dict[str, np.ndarray | None], meta: dict[str, Any]) -> None:
        """Log 1 request in ``sample_every`` with its images (input, mask, output)."""
        self.seen += 1
        if self.lin.exp is None or (self.seen - 1) % self.spec.sample_every:
            return
        from PIL import Image

        for kind, img in images.items():
            if img is None:
                continue
            arr = np.asarray(img)
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            name = f"{endpoint}/{meta.get('request_id', '')[:12]}/{kind}"
            self.lin._safe(lambda b=buf, n=name: self.lin.exp.log_image(io.BytesIO(b.getvalue()), name=n,
                                                                       metadata=meta))  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        if self.lin.exp is not None:
            self.flush()
            self.lin._end()
