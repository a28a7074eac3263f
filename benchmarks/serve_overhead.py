"""What HTTP on Ray Serve adds to a ``/v1/detect`` request, and how replicas and batching change throughput.

One real photo (``promptpaint.samples.make_photos``, 0.3 MP JPEG by default), queries "dog,car", threshold 0
(so the answer carries boxes), tiny random-weight models, lineage off. The script starts a private Ray
(``ray.init(num_cpus=2, object_store_memory=512 MiB, include_dashboard=False)``), Serve's HTTP proxy on
127.0.0.1 (a free port) and the full app (``promptpaint.serve.app.build``: ingress + detect, segment, inpaint,
generate; 0.2 CPU per model replica, 2 inpaint/generate steps) with a bearer token, then measures in one run:

1. Added latency, deployment R1/B1 (1 detect replica, ``max_batch_size`` 1): N sequential triples of the same
   request: a direct in-process call of the stage (``Detector(spec.detect, spec.runtime, models_dir)`` on a
   ``base_batch`` row, 1 torch thread like the replica), a Serve handle call of the detect deployment from this
   process (the decoded image, as the ingress sends it) and the request over HTTP (httpx, one keep-alive
   client, multipart upload, bearer token); the order rotates. added = HTTP latency - direct time of the same
   triple. The handle time and the response's ``lineage.ms`` (ingress handler time: parse, decode, model call)
   split it into handle - direct (Ray call + replica), ingress - handle (the ingress's own work) and
   HTTP - ingress (proxy, transport, client).
2. Throughput under load: C client threads (own keep-alive clients) send M requests in all; requests/s =
   200 responses / wall time from the first send to the last answer. R1/B1 against R2/B1 (2 replicas).
   CPU time (user + system) of the ingress, detect and proxy processes and of this process (the clients)
   over the load, per request.
3. Batching: R1/B4 (``max_batch_size`` 4, ``batch_wait_timeout_s`` 0.01) under the same load against R1/B1, and
   the sequential latency of R1/B4 (a lone request waits out the batch timeout).
The app is deleted and run again (``serve.delete`` / ``serve.run``) between deployments. Warm-up requests
come first in every phase and are not counted. A deadline (``--budget-s``) cuts every loop short
(``truncated``: true).

Prints one JSON line:
  photo, n, concurrency, load_requests, cpus, loadavg_start/end   the inputs and the machine
  direct_ms_p50/p99, http_ms_p50/p99         the two sides of phase 1 (ms)
  added_ms_p50/p99, added_target_met         HTTP - direct per triple; targets p50 <= 3 ms, p99 <= 10 ms
  handle_ms_p50, ingress_ms_p50              Serve handle call; ingress handler time (lineage.ms)
  split_{handle,ingress,proxy}_ms_p50        medians of handle - direct, ingress - handle, HTTP - ingress
  replica_nice                               nice value of the Serve processes (Ray workers) and this one
  decode_ms_p50                              decode_image of the photo in-process (the ingress pays it; the
                                             direct call gets decoded pixels)
  same_result                                the direct call and HTTP gave the same labels and boxes
  b4_http_ms_p50, b4_added_ms_p50/p99        phase 1 repeated (N/4 triples) on R1/B4
  rps_{r1_b1,r2_b1,r1_b4}, load_ms_p50_*, load_errors_*   phases 2 and 3
  mean_batch_{r1_b1,r1_b4}                   requests per model call in the detect replica under load
  core_ms_per_req_*                          CPU ms per request by process role under load
  r2_vs_r1, b4_vs_b1                         throughput ratios
  deploy_s_*, wall_s, truncated

Usage: python benchmarks/serve_overhead.py [--n 100] [--concurrency 8] [--load-requests 96]
                                            [--megapixels 0.3 0.3] [--models-dir DIR] [--budget-s 900]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_CONFIG_DIR": "/tmp/yolo-cfg",
    "COMET_DISABLE_AUTO_LOGGING": "1",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APP = "promptpaint"
QUERIES = "dog,car"
TOKEN = "serve-overhead-benchmark-token"
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="sequential request pairs of phase 1 (after warm-up)")
    ap.add_argument("--warmup", type=int, default=5, help="uncounted pairs / requests before each phase")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads under load")
    ap.add_argument("--load-requests", type=int, default=96, help="requests per load phase (all threads together)")
    ap.add_argument("--megapixels", type=float, nargs=2, default=(0.3, 0.3), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", default=str(REPO / ".models" / "tiny"))
    ap.add_argument("--budget-s", type=float, default=900.0, help="cut every loop short after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="per HTTP request")
    args = ap.parse_args(argv)
    if args.n < 4 or args.load_requests < args.concurrency or args.concurrency < 1:
        ap.error("need --n >= 4, --concurrency >= 1 and --load-requests >= --concurrency")
    return args


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.hit = False

    def over(self) -> bool:
        if time.monotonic() > self.end:
            self.hit = True
        return self.hit


def serve_spec(args: argparse.Namespace, work: Path, port: int, replicas: int, batch: int) -> Any:
    from promptpaint.config import ServeSpec, build_spec

    return build_spec(
        ServeSpec,
        {
            "models_dir": args.models_dir,
            "output": str(work / "out"),
            "detect": {"queries": QUERIES.split(","), "threshold": 0.0},
            "inpaint": {"steps": 2},
            "generate": {"steps": 2},
            "http": {"host": "127.0.0.1", "port": port, "token_file": str(work / "token")},
            "deployments": {"num_cpus": 0.2, "min_replicas": replicas, "max_replicas": replicas,
                            "max_batch_size": batch, "batch_wait_timeout_s": 0.01},
            "lineage": {"mode": "off"},
        },
    )  # fmt: skip


def deploy(spec: Any) -> float:
    from ray import serve

    from promptpaint.serve.app import build

    t0 = time.perf_counter()
    serve.run(build(spec), name=APP, route_prefix="/")
    return round(time.perf_counter() - t0, 1)


def undeploy() -> None:
    from ray import serve

    serve.delete(APP)


def detect_stats() -> dict[str, float]:
    """The detect replica's counters (with 2 replicas: one of them, whichever the handle picks)."""
    from ray import serve

    handle = serve.get_deployment_handle("detect", app_name=APP)
    return handle.stats.remote().result(timeout_s=30)


class Client:
    """One keep-alive HTTP client posting the photo to /v1/detect."""

    def __init__(self, url: str, photo: bytes, timeout: float):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"})
        self.photo = photo

    def detect(self) -> tuple[float, int, dict[str, Any] | None]:
        t0 = time.perf_counter()
        r = self.http.post("/v1/detect", files={"image": ("photo.jpg", self.photo, "image/jpeg")},
                           data={"queries": QUERIES})  # fmt: skip
        ms = (time.perf_counter() - t0) * 1000
        return ms, r.status_code, (r.json() if r.status_code == 200 else None)

    def close(self) -> None:
        self.http.close()


class Direct:
    """The stage in this process, called the way the detect replica calls it (``base_batch``, one row)."""

    def __init__(self, spec: Any, image: np.ndarray):
        import torch

        from promptpaint.actors.detector import Detector

        torch.set_num_threads(1)  # what the replica sets for num_cpus 0.2
        self.det = Detector(spec.detect, spec.runtime, spec.models_dir)
        self.image = image

    def detect(self) -> tuple[float, dict[str, list[Any]]]:
        from promptpaint.serve.models import base_batch

        t0 = time.perf_counter()
        batch = base_batch(["direct"], [self.image])
        self.det(batch)
        return (time.perf_counter() - t0) * 1000, batch


def same_answer(batch: dict[str, list[Any]], body: dict[str, Any]) -> bool:
    mine = [
        (lab, [round(float(x), 2) for x in b]) for b, lab in zip(batch["boxes"][0], batch["labels"][0], strict=True)
    ]
    theirs = [(b["label"], b["box"]) for b in body["boxes"]]
    return mine == theirs


def sequential(client: Client, direct: Direct, n: int, warmup: int, deadline: Deadline) -> dict[str, Any]:
    """Triples of the same request, sequential: direct call, Serve handle call of the detect deployment from this
    process, HTTP; the order rotates every triple. Per-triple differences."""
    from ray import serve

    handle = serve.get_deployment_handle("detect", app_name=APP)
    req = {"id": "handle", "image": direct.image, "queries": QUERIES.split(","), "threshold": 0.0}

    def via_handle() -> float:
        t0 = time.perf_counter()
        handle.remote(req).result(timeout_s=60)
        return (time.perf_counter() - t0) * 1000

    out: dict[str, list[float]] = {"direct": [], "handle": [], "http": [], "ingress": [], "added": []}
    errors, same = 0, None
    for i in range(warmup + n):
        if deadline.over():
            break
        got: dict[str, Any] = {}
        for k in range(3):
            which = (i + k) % 3
            if which == 0:
                got["direct"], got["batch"] = direct.detect()
            elif which == 1:
                got["handle"] = via_handle()
            else:
                got["http"], _, got["body"] = client.detect()
        body = got["body"]
        if body is None:
            errors += 1
            continue
        if same is None:
            same = same_answer(got["batch"], body)
        if i < warmup:
            continue
        for key in ("direct", "handle", "http"):
            out[key].append(got[key])
        out["ingress"].append(float(body["lineage"]["ms"]))
        out["added"].append(got["http"] - got["direct"])
    return {"pairs": len(out["added"]), "errors": errors, "same_result": same, **out}


def diffs(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


ROLES = {
    "ingress": "ServeReplica:promptpaint:ingress",
    "detect": "ServeReplica:promptpaint:detect",
    "proxy": "ProxyActor",
}


def serve_processes() -> dict[str, list[Any]]:
    """This run's Serve processes by role (descendants of this process: the private Ray's raylet spawned them),
    and this process (``driver``: the HTTP clients, the direct calls)."""
    import psutil

    me = psutil.Process()
    out: dict[str, list[Any]] = {role: [] for role in ROLES}
    for p in me.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for role, key in ROLES.items():
            if key in cmd:
                out[role].append(p)
    out["driver"] = [me]
    return out


def cpu_seconds(procs: dict[str, list[Any]]) -> dict[str, float]:
    import psutil

    total: dict[str, float] = {}
    for role, ps in procs.items():
        total[role] = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total[role] += t.user + t.system
    return total


def niceness(procs: dict[str, list[Any]]) -> dict[str, list[int]]:
    import psutil

    out: dict[str, list[int]] = {}
    for role, ps in procs.items():
        vals = []
        for p in ps:
            try:
                vals.append(p.nice())
            except psutil.Error:
                continue
        out[role] = vals
    return out


def load(url: str, photo: bytes, args: argparse.Namespace, total: int, deadline: Deadline) -> dict[str, Any]:
    """``args.concurrency`` threads, each with its own keep-alive client, share ``total`` requests."""
    lock = threading.Lock()
    left = [total]
    lat: list[float] = []
    statuses: dict[int, int] = {}
    ends: list[float] = []
    start = threading.Barrier(args.concurrency + 1)

    def worker() -> None:
        client = Client(url, photo, args.timeout_s)
        try:
            start.wait()
            while not deadline.over():
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                try:
                    ms, status, _ = client.detect()
                except Exception:  # noqa: BLE001 - a timeout or reset counts as an error, the load goes on
                    ms, status = float("nan"), -1
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        lat.append(ms)
                        ends.append(time.perf_counter())
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=max(1.0, deadline.end - time.monotonic()) + args.timeout_s)
    wall = (max(ends) - t0) if ends else float("nan")
    return {
        "ok": len(lat),
        "rps": round(len(lat) / wall, 2) if lat else None,
        "ms_p50": pct(lat, 50),
        "ms_p99": pct(lat, 99),
        "errors": {str(k): v for k, v in statuses.items() if k != 200},
        "wall_s": round(wall, 2),
    }


def load_phase(url: str, photo: bytes, args: argparse.Namespace, deadline: Deadline, stats: bool) -> dict[str, Any]:
    load(url, photo, args, max(2 * args.concurrency, args.warmup), deadline)  # warm-up: every replica
    before = detect_stats() if stats else None
    procs = serve_processes()
    cpu0 = cpu_seconds(procs)
    res = load(url, photo, args, args.load_requests, deadline)
    cpu1 = cpu_seconds(procs)
    if res["ok"]:
        res["core_ms_per_req"] = {r: round((cpu1[r] - cpu0[r]) * 1000 / res["ok"], 1) for r in cpu0}
    if stats:
        after = detect_stats()
        calls = after.get("calls", 0) - before.get("calls", 0)
        res["mean_batch"] = round((after.get("requests", 0) - before.get("requests", 0)) / calls, 2) if calls else None
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = Deadline(args.budget_s)
    if not Path(args.models_dir).is_dir():
        sys.exit(f"no tiny model set at {args.models_dir} (build one: promptpaint models build-tiny DIR, or make)")
    work = Path(tempfile.mkdtemp(prefix="pp-serveovh-"))
    try:
        fig = measure(args, work, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fig["wall_s"] = round(time.perf_counter() - t_start, 1)
    fig["truncated"] = deadline.hit
    print(json.dumps(fig))


def measure(args: argparse.Namespace, work: Path, deadline: Deadline) -> dict[str, Any]:
    import ray
    from ray import serve

    from promptpaint.io import decode_image
    from promptpaint.samples import make_photos

    (work / "token").write_text(TOKEN)
    path = make_photos(work / "photos", 1, megapixels=tuple(args.megapixels), seed=args.seed)[0]
    photo = path.read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = serve_spec(args, work, port, 1, 1)
    image = decode_image(photo, max_pixels=base.limits.max_pixels, formats=base.limits.formats).rgb
    decode_ms = []
    for _ in range(20):
        t0 = time.perf_counter()
        decode_image(photo, max_pixels=base.limits.max_pixels, formats=base.limits.formats)
        decode_ms.append((time.perf_counter() - t0) * 1000)
    direct = Direct(base, image)

    fig: dict[str, Any] = {
        "benchmark": "serve_overhead",
        "photo": {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "bytes": len(photo),
            "format": path.suffix.lstrip("."),
        },
        "queries": QUERIES,
        "n": args.n,
        "concurrency": args.concurrency,
        "load_requests": args.load_requests,
        "cpus": os.cpu_count(),
        "ray_cpus": 2,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    ray.init(
        address="local",  # a private instance: never join another cluster on this machine
        num_cpus=2,
        object_store_memory=512 * MB,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        _temp_dir=str(work / "ray"),
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # -- R1/B1: added latency, then load
        fig["deploy_s_r1_b1"] = deploy(base)
        client = Client(url, photo, args.timeout_s)
        seq = sequential(client, direct, args.n, args.warmup, deadline)
        client.close()
        fig.update(
            pairs=seq["pairs"],
            seq_errors=seq["errors"],
            same_result=seq["same_result"],
            direct_ms_p50=pct(seq["direct"], 50),
            direct_ms_p99=pct(seq["direct"], 99),
            http_ms_p50=pct(seq["http"], 50),
            http_ms_p99=pct(seq["http"], 99),
            added_ms_p50=pct(seq["added"], 50),
            added_ms_p99=pct(seq["added"], 99),
            handle_ms_p50=pct(seq["handle"], 50),
            ingress_ms_p50=pct(seq["ingress"], 50),
            split_handle_ms_p50=pct(diffs(seq["handle"], seq["direct"]), 50),
            split_ingress_ms_p50=pct(diffs(seq["ingress"], seq["handle"]), 50),
            split_proxy_ms_p50=pct(diffs(seq["http"], seq["ingress"]), 50),
            decode_ms_p50=pct(decode_ms, 50),
            replica_nice=niceness(serve_processes()),
        )
        if seq["added"]:
            fig["added_target_met"] = fig["added_ms_p50"] <= 3.0 and fig["added_ms_p99"] <= 10.0
        print(json.dumps({"phase": "latency_r1_b1", **{k: fig[k] for k in fig if "ms" in k}}), file=sys.stderr)
        runs: dict[str, dict[str, Any]] = {}
        runs["r1_b1"] = load_phase(url, photo, args, deadline, stats=True)
        print(json.dumps({"phase": "load_r1_b1", **runs["r1_b1"]}), file=sys.stderr, flush=True)
        undeploy()

        # -- R1/B4: batching on, load, then sequential latency
        fig["deploy_s_r1_b4"] = deploy(serve_spec(args, work, port, 1, 4))
        runs["r1_b4"] = load_phase(url, photo, args, deadline, stats=True)
        print(json.dumps({"phase": "load_r1_b4", **runs["r1_b4"]}), file=sys.stderr, flush=True)
        client = Client(url, photo, args.timeout_s)
        seq4 = sequential(client, direct, max(4, args.n // 4), args.warmup, deadline)
        client.close()
        fig.update(b4_pairs=seq4["pairs"], b4_http_ms_p50=pct(seq4["http"], 50),
                   b4_added_ms_p50=pct(seq4["added"], 50), b4_added_ms_p99=pct(seq4["added"], 99))  # fmt: skip
        undeploy()

        # -- R2/B1: two detect replicas, load
        fig["deploy_s_r2_b1"] = deploy(serve_spec(args, work, port, 2, 1))
        runs["r2_b1"] = load_phase(url, photo, args, deadline, stats=False)
        print(json.dumps({"phase": "load_r2_b1", **runs["r2_b1"]}), file=sys.stderr, flush=True)
        undeploy()
    finally:
        serve.shutdown()
        ray.shutdown()

    for key, res in runs.items():
        fig[f"rps_{key}"] = res["rps"]
        fig[f"load_ms_p50_{key}"] = res["ms_p50"]
        fig[f"load_ms_p99_{key}"] = res["ms_p99"]
        fig[f"load_errors_{key}"] = res["errors"]
        fig[f"core_ms_per_req_{key}"] = res.get("core_ms_per_req")
        if "mean_batch" in res:
            fig[f"mean_batch_{key}"] = res["mean_batch"]

    def ratio(a: str, b: str) -> float | None:
        x, y = runs.get(a, {}).get("rps"), runs.get(b, {}).get("rps")
        return round(x / y, 3) if x and y else None

    fig["r2_vs_r1"] = ratio("r2_b1", "r1_b1")
    fig["b4_vs_b1"] = ratio("r1_b4", "r1_b1")
    fig["loadavg_end"] = round(os.getloadavg()[0], 2)
    return fig


if __name__ == "__main__":
    main()
