"""Lineage to Comet: one experiment per job, a bounded number of calls whatever the corpus size.

``Lineage.start`` opens the experiment on the driver before any model work (so its key can be stamped
into every output PNG and manifest row), ``fold`` takes each task block's share of the dataset fingerprint
and image sample (computed where its rows were made), ``on_batch`` logs metrics as results stream in (throttled),
``finish`` logs the sampled images, the manifest and the spec, then closes the experiment. Offline
archives land in ``<output>/comet/`` and upload later with ``comet upload``.

Comet failures never lose work: by default they warn and the job goes on with lineage kept in the
manifest; ``lineage.require: true`` turns an unreachable server or a bad key into an error at start.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import io as _io
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptpaint.config import EditSpec, comet_env
from promptpaint.io import atomic_write, decode_image, join, local_path, read_bytes

log = logging.getLogger("promptpaint.lineage")

PACKAGES = ("promptpaint", "torch", "diffusers", "transformers", "ray", "pillow", "numpy", "comet-ml")
SAMPLE_STATUSES = ("edited", "detected", "segmented", "no_detection")


class LineageUnavailable(RuntimeError):
    """``lineage.require`` is set and Comet cannot be used."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(folder: str | Path | None) -> str | None:
    """HEAD of the git repository holding the spec file, if any."""
    if folder is None:
        return None
    try:
        res = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def comet_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """Ask the configured Comet server for its version, quickly (comet_ml itself retries for ~30 s)."""
    import requests
    from comet_ml.config import get_backend_address
    from comet_ml.config.config_api import get_root_url
    from comet_ml.connection.connection_url_helpers import get_backend_version_url

    url = get_backend_version_url(get_root_url(get_backend_address()))
    try:
        r = requests.get(url, timeout=timeout)
    except requests.RequestException as e:
        return False, f"{url}: {type(e).__name__}: {e}"
    return r.ok, f"{url}: HTTP {r.status_code}"


class Sampler:
    """The ``k`` rows with the smallest ids: a deterministic sample of a stream, O(k) memory."""

    def __init__(self, k: int):
        self.k = k
        # A min-heap on the order-reversed id keeps the *largest* kept id on top, ready to be evicted.
        self.heap: list[tuple[str, str, dict[str, Any]]] = []

    def offer(self, row: dict[str, Any]) -> None:
        if self.k <= 0 or row["status"] not in SAMPLE_STATUSES:
            return
        item = (_neg(row["id"]), row["input_path"], row)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def rows(self) -> list[dict[str, Any]]:
        return sorted((r for _, _, r in self.heap), key=lambda r: (r["id"], r["input_path"]))


class Fingerprint:
    """Order-independent fingerprint of a multiset of hex ids: their sum mod 2**256, O(1) memory."""

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def add(self, hex_id: str) -> None:
        self.total = (self.total + int(hex_id, 16)) % 2**256
        self.count += 1

    def merge(self, hexdigest: str, count: int) -> None:
        """Add another fingerprint (of a disjoint part of the stream, e.g. a task block's)."""
        self.total = (self.total + int(hexdigest, 16)) % 2**256
        self.count += count

    def hexdigest(self) -> str:
        return f"{self.total:064x}"


def _neg(hex_id: str) -> str:
    """Order-reversing map on hex strings, so heapq's min-heap keeps the k smallest ids."""
    return hex_id.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


class Lineage:
    """The Comet side of a job. ``mode`` is the resolved one: off | offline | online."""

    def __init__(self, spec: EditSpec, mode: str, experiment: Any = None, offline_dir: str | None = None):
        self.spec = spec
        self.mode = mode
        self.exp = experiment
        self.offline_dir = offline_dir
        self.key = experiment.get_key() if experiment is not None else ""
        self.sampler = Sampler(spec.lineage.sample_images if experiment is not None else 0)
        self.fingerprint = Fingerprint()
        self.last_metrics = 0.0
        self.degraded = ""

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def start(cls, spec: EditSpec, name: str, spec_path: str | None = None, models: Any = None) -> Lineage:
        env = comet_env()
        mode = spec.lineage.mode
        if mode == "auto":
            mode = "online" if env["api_key"] else "offline"
        if mode == "off":
            return cls(spec, "off")
        if mode == "online":
            problem = "" if env["api_key"] else "COMET_API_KEY is not set"
            if not problem:
                ok, detail = comet_reachable()
                problem = "" if ok else f"Comet is unreachable ({detail})"
            if problem:
                if spec.lineage.require:
                    raise LineageUnavailable(
                        f"lineage.require is set and {problem}. Fix the key/network, or set lineage.mode=offline "
                        "(uploadable later with `comet upload`), or lineage.require=false to continue without it."
                    )
                log.warning("%s; writing an offline Comet archive instead", problem)
                mode = "offline"
        try:
            lin = cls._open(spec, mode, env, name)
        except Exception as e:  # noqa: BLE001 - lineage must not cost the job unless required
            if spec.lineage.require:
                raise LineageUnavailable(f"could not start the Comet experiment: {type(e).__name__}: {e}") from e
            log.warning("Comet experiment could not start (%s); continuing without it", e)
            return cls(spec, "off")
        lin._log_start(name, spec_path, models)
        return lin

    @classmethod
    def _open(cls, spec: EditSpec, mode: str, env: dict[str, Any], name: str) -> Lineage:
        import comet_ml

        offline_dir = None
        if mode == "offline":
            local = local_path(join(spec.output, "comet"))
            offline_dir = local or tempfile.mkdtemp(prefix="promptpaint-comet-")  # copied at the end
            Path(offline_dir).mkdir(parents=True, exist_ok=True)
        config = comet_ml.ExperimentConfig(
            offline_directory=offline_dir,
            name=name,
            tags=["promptpaint", f"mode:{spec.mode}"],
            display_summary_level=0,
            log_code=False,
            log_graph=False,
            parse_args=False,
            log_git_metadata=False,
            log_git_patch=False,
            log_env_details=False,
            log_env_gpu=False,
            log_env_host=False,
            log_env_cpu=False,
            auto_output_logging=False,
            auto_param_logging=False,
            auto_metric_logging=False,
        )
        exp = comet_ml.start(
            online=mode == "online",
            project_name=spec.lineage.project or env["project"],
            workspace=spec.lineage.workspace or env["workspace"],
            experiment_config=config,
        )
        if mode == "online" and not getattr(exp, "alive", True):
            exp.end()
            raise ConnectionError("the Comet server refused the experiment (check COMET_API_KEY and the workspace)")
        return cls(spec, mode, exp, offline_dir)

    def _log_start(self, name: str, spec_path: str | None, models: Any) -> None:
        def go() -> None:
            self.exp.log_parameters(self.spec.flat())
            self.exp.log_others(
                {
                    "promptpaint.job": name,
                    "promptpaint.spec_hash": self.spec.spec_hash(),
                    "promptpaint.lineage_mode": self.mode,
                    "promptpaint.git_commit": git_commit(Path(spec_path).parent if spec_path else None) or "none",
                    **{f"version.{k}": v for k, v in package_versions().items()},
                    **{f"model.{stage}.{k}": str(v) for stage, info in (models or {}).items() for k, v in info.items()},
                }
            )

        self._safe(go)

    # -- during the job ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.exp is not None and not self.degraded

    def artifact_note(self) -> str:
        return {
            "online": f"comet artifact promptpaint-{self.spec.spec_hash()}",
            "offline": "offline: manifest logged as an asset (Comet Artifacts need an online experiment)",
        }.get(self.mode, "off")

    def on_batch(self, stats: dict[str, Any], step: int, force: bool = False) -> None:
        """Metrics so far; at most one Comet call every ``lineage.metrics_every_s`` seconds."""
        now = time.monotonic()
        if not self.active or (not force and now - self.last_metrics < self.spec.lineage.metrics_every_s):
            return
        self.last_metrics = now
        self._safe(lambda: self.exp.log_metrics(stats, step=step))

    # -- end ---------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any], manifest_parts: list[str], spec_yaml: str) -> dict[str, Any]:
        """Final metrics, sampled images, manifest (this run's parts as one Parquet file) + spec assets;
        closes the experiment.

        Returns what the job summary should record about lineage.
        """
        if self.exp is None:
            return {"mode": self.mode, "experiment_key": ""}
        fingerprint = self.fingerprint.hexdigest()
        samples = self.sampler.rows()

        def go() -> None:
            self.exp.log_others(
                {"promptpaint.dataset_fingerprint": fingerprint, "promptpaint.inputs": self.fingerprint.count}
            )
            self.exp.log_metrics(flatten_metrics(summary), step=summary.get("processed", 0))
            for row in samples:
                self._log_sample(row)
            self.exp.log_asset_data(spec_yaml, name="spec.yaml")
            self._log_manifest(manifest_parts)
            if self.mode == "online":
                self._log_artifact()

        self._safe(go)
        archive = self._end()
        return {
            "mode": self.mode,
            "experiment_key": self.key,
            "dataset_fingerprint": fingerprint,
            "sampled_images": len(samples),
            "artifact": self.artifact_note(),
            "offline_archive": archive,
            "degraded": self.degraded or None,
        }

    def _log_manifest(self, parts: list[str]) -> None:
        """The run's parts combined into one file on local disk, part by part (the driver's memory stays flat)."""
        from promptpaint.manifest import combine_file

        folder = tempfile.mkdtemp(prefix="promptpaint-manifest-")
        try:
            path = os.path.join(folder, "manifest.parquet")
            if combine_file(parts, path):
                # copy_to_tmp: Comet uploads later, from its own copy; this folder goes now.
                self.exp.log_asset(path, file_name="manifest.parquet", copy_to_tmp=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def fold(self, fingerprint: str, count: int, samples: list[dict[str, Any]]) -> None:
        """A task block's share, computed where its rows were made: its ids' fingerprint and count, and its
        sample candidates."""
        if self.exp is None:
            return
        self.fingerprint.merge(fingerprint, count)
        for row in samples:
            self.sampler.offer(row)

    def abort(self, reason: str) -> None:
        """The job failed: record why and close the experiment (an offline archive is still written)."""
        if self.exp is None:
            return
        self._safe(lambda: self.exp.log_other("promptpaint.failed", reason))
        self._end()

    def _log_sample(self, row: dict[str, Any]) -> None:
        """Input with boxes as annotations, mask overlay and before/after, for one sampled row."""
        src = decode_image(
            read_bytes(row["input_path"]), max_pixels=self.spec.limits.max_pixels, formats=self.spec.limits.formats
        )
        before = src.rgb
        boxes = [
            {"boxes": [[b[0], b[1], b[2] - b[0], b[3] - b[1]]], "label": lab, "score": float(s)}
            for b, lab, s in zip(row["boxes"], row["labels"], row["det_scores"], strict=False)
        ]
        meta = {"id": row["id"], "input_path": row["input_path"], "status": row["status"], "seed": row["seed"]}
        short = row["id"][:12]
        self.exp.log_image(
            Image.fromarray(before),
            name=f"input/{short}",
            annotations=[{"name": "detections", "data": boxes}],
            metadata=meta,
        )
        if row["status"] not in ("edited", "segmented"):
            return
        mask = np.asarray(Image.open(_io.BytesIO(read_bytes(row["mask_path"]))))
        # edit: blend weights 0..255; segment: an instance label map (any label = covered)
        weight = mask.astype(np.float32) / 255.0 if row["status"] == "edited" else (mask > 0).astype(np.float32)
        overlay = before.astype(np.float32)
        a = weight[..., None] * 0.6
        overlay = (overlay * (1 - a) + np.array([255.0, 0.0, 0.0]) * a).astype(np.uint8)
        self.exp.log_image(Image.fromarray(overlay), name=f"mask_overlay/{short}", metadata=meta)
        if row["status"] != "edited":
            return
        after = np.asarray(Image.open(_io.BytesIO(read_bytes(row["output_path"]))).convert("RGB"))
        self.exp.log_image(
            Image.fromarray(np.concatenate([before, after], axis=1)), name=f"before_after/{short}", metadata=meta
        )

    def _log_artifact(self) -> None:
        import comet_ml

        art = comet_ml.Artifact(
            name=f"promptpaint-{self.spec.spec_hash()}",
            artifact_type="dataset",
            metadata={"output": self.spec.output, "spec_hash": self.spec.spec_hash()},
        )
        art.add_remote(self.spec.output, logical_path="output")
        self.exp.log_artifact(art)

    def _end(self) -> str | None:
        """Close the experiment; copy an offline archive to ``<output>/comet/``."""
        try:  # always, even when degraded: an unended experiment writes its archive at exit, elsewhere
            self.exp.end()
        except Exception as e:  # noqa: BLE001
            log.warning("Comet experiment did not end cleanly: %s", e)
        if self.mode != "offline" or not self.offline_dir:
            return None
        archives = sorted(Path(self.offline_dir).glob(f"{self.key}*.zip"))
        if not archives:
            return None
        final = join(self.spec.output, "comet", archives[-1].name)
        if local_path(final) is None:  # remote output: the archive was written locally, ship it
            for z in archives:
                atomic_write(join(self.spec.output, "comet", z.name), z.read_bytes())
            shutil.rmtree(self.offline_dir, ignore_errors=True)
        return final

    def _safe(self, fn: Any) -> None:
        """Run a Comet call; a failure degrades lineage to manifest-only instead of failing the job."""
        if self.exp is None or self.degraded:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - see the module docstring
            self.degraded = f"{type(e).__name__}: {e}"
            log.warning("Comet logging failed (%s); lineage continues in the manifest only", self.degraded)


def flatten_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The job summary's numbers as Comet metric names (``count.edited``, ``error.truncated``...)."""
    out: dict[str, float] = {}
    for k, v in summary.get("counts", {}).items():
        out[f"count.{k}"] = v
    for k, v in summary.get("errors", {}).items():
        out[f"error.{k}"] = v
    for k, v in summary.get("stage_ms_per_image", {}).items():
        out[f"ms_per_image.{k}"] = v
    for k in ("processed", "images_per_second", "seconds"):
        if k in summary:
            out[k] = summary[k]
    return out


def running_stats(counts: Counter[str], errors: Counter[str], stage_ms: Counter[str], t0: float) -> dict[str, float]:
    processed = sum(v for k, v in counts.items() if k != "skipped")
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return flatten_metrics(
        {
            "counts": dict(counts),
            "errors": dict(errors),
            "stage_ms_per_image": {k: v / max(processed, 1) for k, v in stage_ms.items()},
            "processed": processed,
            "images_per_second": processed / elapsed,
        }
    )


def job_name(spec: EditSpec) -> str:
    return os.path.basename(spec.output.rstrip("/")) or "promptpaint"
