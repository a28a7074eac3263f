"""Model deployments: the bulk job's stage classes (Detector, Segmenter, Inpainter, Generator) in Serve replicas.

Each deployment batches requests with ``@serve.batch`` (size and wait from ``deployments``), groups a batch by
the parameters that must be equal within one model call, and runs the stage on a worker thread so the
replica's event loop stays free (health checks, cancellation). The diffusion deployments pick a LoRA per
request with ``@serve.multiplexed`` (model id = LoRA id; Serve routes a LoRA's requests to replicas that have
it and never mixes LoRA ids in one batch); evicted LoRAs are unloaded (``delete_adapters``).

A cancelled request (the HTTP client went away) cancels its batch; the pipeline's step-end callback then
raises at the next denoising step, so the replica is free again within one step.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections import Counter
from typing import Any

import numpy as np
from ray import serve

from promptpaint.config import DetectSpec, ServeSpec
from promptpaint.io import join


class Cancelled(Exception):
    """Raised inside a diffusion loop whose requests were all cancelled."""


def base_batch(ids: list[str], images: list[np.ndarray] | None = None) -> dict[str, list[Any]]:
    """The row plumbing every stage expects (id, status, error columns) for ``ids``."""
    n = len(ids)
    batch: dict[str, list[Any]] = {"id": list(ids), "status": [""] * n}
    batch.update({k: [""] * n for k in ("error_stage", "error_kind", "error_message")})
    if images is not None:
        batch["image"] = list(images)
    return batch


def _row_error(batch: dict[str, list[Any]], i: int) -> dict[str, Any] | None:
    if batch["status"][i] in ("", "no_detection"):
        return None
    return {"status": batch["status"][i], "kind": batch["error_kind"][i], "message": batch["error_message"][i]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Batched:
    """Shared plumbing: spec, counters, batch settings."""

    def _setup(self, spec_json: dict[str, Any]) -> ServeSpec:
        import torch

        spec = ServeSpec.model_validate(spec_json)
        self.spec = spec
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()  # one model call at a time per replica (LoRA switches, configure)
        d = spec.deployments
        self.handle_batch.set_max_batch_size(d.max_batch_size)
        self.handle_batch.set_batch_wait_timeout_s(d.batch_wait_timeout_s)
        torch.set_num_threads(max(1, int(d.num_cpus)))
        return spec

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "rss_mb": _rss_mb()}

    @serve.batch
    async def handle_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch through the subclass's ``_run`` on a worker thread (the replica's event loop stays free)."""
        return await asyncio.to_thread(self._run, reqs)

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.handle_batch(req)


@serve.deployment(name="detect")
class DetectModel(_Batched):
    def __init__(self, spec_json: dict[str, Any]):
        from promptpaint.actors.detector import Detector

        spec = self._setup(spec_json)
        self.det = Detector(spec.detect, spec.runtime, spec.models_dir)
        self.info = _model_info(self.det.loaded)

    def _run(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in reqs]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, r in enumerate(reqs):
            groups.setdefault((tuple(r["queries"]), r["threshold"]), []).append(k)
        with self.lock:
            for (queries, threshold), idx in groups.items():
                spec = DetectSpec(model=self.spec.detect.model, queries=list(queries), threshold=threshold,
                                  top_k=self.spec.detect.top_k)  # fmt: skip
                self.det.configure(spec)
                batch = base_batch([reqs[k]["id"] for k in idx], [reqs[k]["image"] for k in idx])
                self.det(batch)
                self.counts["calls"] += 1
                for j, k in enumerate(idx):
                    out[k] = {
                        "boxes": np.asarray(batch["boxes"][j], np.float32),
                        "labels": list(batch["labels"][j]),
                        "scores": np.asarray(batch["det_scores"][j], np.float32),
                        "error": _row_error(batch, j),
                        "model": self.info,
                    }
        self.counts["requests"] += len(reqs)
        return out


@serve.deployment(name="segment")
class SegmentModel(_Batched):
    def __init__(self, spec_json: dict[str, Any]):
        from promptpaint.actors.segmenter import Segmenter

        spec = self._setup(spec_json)
        self.seg = Segmenter(spec.segment, spec.runtime, spec.models_dir)
        self.info = _model_info(self.seg.loaded)

    def _run(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batch = base_batch([r["id"] for r in reqs], [r["image"] for r in reqs])
        batch["boxes"] = [np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in reqs]
        batch["prompt_points"] = [np.asarray(r["points"], np.float32).reshape(-1, 2) for r in reqs]
        batch["prompt_labels"] = [np.asarray(r["point_labels"], np.int64).reshape(-1) for r in reqs]
        with self.lock:
            self.seg(batch)
        self.counts["requests"] += len(reqs)
        self.counts["calls"] += 1
        return [
            {
                "masks": np.asarray(batch["masks"][j], bool),
                "scores": np.asarray(batch["mask_scores"][j], np.float32),
                "error": _row_error(batch, j),
                "model": self.info,
            }
            for j in range(len(reqs))
        ]


class _Adapter:
    """A LoRA loaded into a pipeline as adapter ``name``; unloaded when Serve's multiplexing evicts it."""

    def __init__(self, owner: _Diffusion, lora_id: str, lineage: dict[str, Any]):
        self.owner, self.name, self.lineage = owner, _adapter_name(lora_id), lineage

    def __del__(self) -> None:
        # Serve calls this on eviction, and Python again when the object is freed: unload once.
        owner, self.__dict__["owner"] = self.__dict__.get("owner"), None
        if owner is not None:
            owner.unload(self.name)


def _adapter_name(lora_id: str) -> str:
    return "lora_" + hashlib.sha256(lora_id.encode()).hexdigest()[:12]


class _Diffusion(_Batched):
    """Inpaint / generate: a diffusers pipeline + multiplexed LoRAs + cancellable loops. A subclass builds its
    stage in ``__init__`` (``_pipe_setup``) and runs one settings group through it in ``_run(reqs)``."""

    def _pipe_setup(self, stage: Any) -> None:
        self.stage = stage
        self.pipe = stage.pipe
        self.info = _model_info(stage.loaded)
        self.cancelled: set[str] = set()  # request ids whose callers went away
        self.running: tuple[str, ...] = ()  # request ids of the model call in progress
        self.stage.on_step = self._on_step

    def _on_step(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.counts["steps"] += 1
        if self.running and self.cancelled.issuperset(self.running):
            raise Cancelled("every request of this model call was cancelled")
        return kwargs

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request; when its caller is cancelled (the HTTP client disconnected), its loop stops at the next
        step once every request sharing the model call is cancelled too."""
        try:
            return await self.handle_batch(req)
        except asyncio.CancelledError:
            self.cancelled.add(req["id"])
            self.counts["cancelled"] += 1
            raise

    # -- LoRAs --------------------------------------------------------------------------------------------
    # LRU size: the spec's lora_cache, handed to the replica process as PROMPTPAINT_LORA_CACHE (deployment_options)
    @serve.multiplexed(max_num_models_per_replica=int(os.environ.get("PROMPTPAINT_LORA_CACHE", "4")))
    async def get_lora(self, lora_id: str) -> _Adapter:
        return await asyncio.to_thread(self._load_lora, lora_id)

    def _load_lora(self, lora_id: str) -> _Adapter:
        from promptpaint.lora import check_lora, local_file

        path = join(self.spec.lora_store or "", lora_id)
        info = check_lora(path, self.stage.loaded.entry.name, "lora")
        file = local_file(info)
        name = _adapter_name(lora_id)
        with self.lock:
            self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
            self.counts["lora_loads"] += 1
        return _Adapter(self, lora_id, {"id": lora_id, **info.lineage(1.0)})

    def unload(self, name: str) -> None:
        with self.lock:
            import gc

            self.pipe.delete_adapters(name)
            self.counts["lora_unloads"] += 1
            gc.collect()

    async def _activate(self, scale: float) -> dict[str, Any] | None:
        lora_id = serve.get_multiplexed_model_id()
        if not lora_id:
            if getattr(self.pipe, "get_list_adapters", None) and any(self.pipe.get_list_adapters().values()):
                self.pipe.disable_lora()
            return None
        adapter = await self.get_lora(lora_id)
        self.pipe.enable_lora()
        self.pipe.set_adapters([adapter.name], adapter_weights=[scale])
        return {**adapter.lineage, "scale": scale}

    @serve.batch
    async def handle_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One model call per group of equal settings and LoRA scale (Serve never mixes LoRA ids in a batch)."""
        results: list[dict[str, Any]] = [{} for _ in reqs]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, r in enumerate(reqs):
            groups.setdefault((r["lora_scale"], *sorted(r["settings"].items())), []).append(k)
        for (scale, *_), idx in groups.items():
            lora = await self._activate(scale)
            part = await self._run_cancellable(self._run, [reqs[k] for k in idx])
            for k, res in zip(idx, part, strict=True):
                results[k] = {**res, "lora": lora}
        return results

    async def _run_cancellable(self, fn: Any, reqs: list[dict[str, Any]]) -> Any:
        ids = tuple(r["id"] for r in reqs)

        def run() -> Any:
            self.running = ids
            try:
                return fn(reqs)
            finally:
                self.running = ()
                self.cancelled.difference_update(ids)

        return await asyncio.to_thread(run)


@serve.deployment(name="inpaint")
class InpaintModel(_Diffusion):
    def __init__(self, spec_json: dict[str, Any]):
        from promptpaint.actors.inpainter import Inpainter

        spec = self._setup(spec_json)
        self._pipe_setup(Inpainter(spec.inpaint, spec.runtime, spec.models_dir))

    def _run(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.lock:
            self.stage.configure(self.spec.inpaint.model_copy(update=reqs[0]["settings"]))
            batch = base_batch([r["id"] for r in reqs], [r["image"] for r in reqs])
            batch["blend"] = [r["blend"] for r in reqs]
            batch["pass_blends"] = [r.get("pass_blends") or [] for r in reqs]
            batch["pass_prompts"] = [r.get("pass_prompts") or [] for r in reqs]
            self.stage(batch)
        self.counts["requests"] += len(reqs)
        self.counts["calls"] += 1
        return [
            {
                "edited": batch["edited"][j],
                "seed": int(batch["seed"][j]),
                "crops": batch["crops"][j],
                "prompts": batch["edit_prompts"][j],
                "error": _row_error(batch, j),
                "model": self.info,
            }
            for j in range(len(reqs))
        ]


@serve.deployment(name="generate")
class GenerateModel(_Diffusion):
    def __init__(self, spec_json: dict[str, Any]):
        from promptpaint.actors.generator import Generator

        spec = self._setup(spec_json)
        self._pipe_setup(Generator(spec.generate, spec.runtime, spec.models_dir))

    def _run(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.lock:
            self.stage.configure(self.spec.generate.model_copy(update=reqs[0]["settings"]))
            batch = base_batch([r["id"] for r in reqs])
            batch["prompt"] = [r["prompt"] for r in reqs]
            batch["negative_prompt"] = [r["negative_prompt"] for r in reqs]
            self.stage(batch)
        self.counts["requests"] += len(reqs)
        self.counts["calls"] += 1
        return [
            {
                "image": batch["image"][j],
                "seed": int(batch["seed"][j]),
                "size": [self.stage.height, self.stage.width],
                "error": _row_error(batch, j),
                "model": self.info,
            }
            for j in range(len(reqs))
        ]


def _model_info(loaded: Any) -> dict[str, str]:
    return {"name": loaded.entry.name, "source": loaded.source, "revision": str(loaded.revision)}
