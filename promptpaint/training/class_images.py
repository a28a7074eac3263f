"""Class images for prior preservation: a Ray Data job over the project's Generator stage, cached on storage.

The cache folder is keyed by everything that changes the pixels (model + weights, class prompt, seed, size,
steps, guidance), not by the count: image k is ``{k:06d}.png`` with its own seed derived from (seed, k), so
asking for 200 after 100 generates only the 100 new ones, and a second run with enough images generates none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from promptpaint.config import GenerateSpec, RuntimeSpec, TrainJobSpec
from promptpaint.io import atomic_write, encode_png, join

CACHE_INFO = "class_images.json"


@dataclass
class ClassImages:
    folder: str
    paths: list[str]  # the first num_class_images, in order
    generated: int  # made by this call (0 = all cached)
    model: str


def generate_spec(job: TrainJobSpec, side: int) -> GenerateSpec:
    t = job.train
    return GenerateSpec(
        model=t.resolved_class_model(),
        prompt=t.class_prompt,
        negative_prompt="",
        steps=t.class_steps,
        seed=t.seed,
        width=side,
        height=side,
        batch=job.runtime.batch("inpaint"),
    )


def cache_key(gen: GenerateSpec, weights: str) -> str:
    blob = json.dumps(
        [gen.model, weights, gen.prompt, gen.negative_prompt, gen.seed, gen.width, gen.height, gen.steps,
         gen.guidance_scale],
        separators=(",", ":"),
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def class_root(job: TrainJobSpec) -> str:
    return job.train.class_data or join(job.storage_path, "class_images")


class _Writer:
    """Ray Data actor: Generator stage + PNG writes into the cache; returns only (id, file, status, error)."""

    def __init__(self, gen: GenerateSpec, runtime: RuntimeSpec, models_dir: str | None, folder: str):
        from promptpaint.actors.generator import Generator

        self.gen = Generator(gen, runtime, models_dir)
        self.folder = folder

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = {"id": [str(x) for x in batch["id"]], "prompt": [str(x) for x in batch["prompt"]]}
        out = self.gen(rows)
        files, status = [], []
        for i, rid in enumerate(rows["id"]):
            if out["status"][i]:
                files.append("")
                status.append(out["error_message"][i].splitlines()[0] if out["error_message"][i] else "error")
                continue
            file = join(self.folder, f"{rid.removeprefix('class-')}.png")
            atomic_write(file, encode_png(out["image"][i], text={"promptpaint:prompt": rows["prompt"][i]}))
            files.append(file)
            status.append("")
        return {"id": rows["id"], "file": files, "error": status}


def ensure_class_images(job: TrainJobSpec, side: int, weights: str, gpus: float, cpus: float) -> ClassImages:
    """Make sure ``train.num_class_images`` class images exist in the cache; generate the missing ones on Ray."""
    import ray

    gen = generate_spec(job, side)
    folder = join(class_root(job), cache_key(gen, weights))
    want = job.train.num_class_images
    names = [f"{k:06d}.png" for k in range(want)]
    fs, root = fsspec.core.url_to_fs(folder)
    have = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root.rstrip('/')}/*.png")} if fs.exists(root) else set()
    missing = [n for n in names if n not in have]
    if missing:
        items = [{"id": f"class-{n.removesuffix('.png')}", "prompt": gen.prompt} for n in missing]
        resources: dict[str, Any] = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": cpus}
        ds = ray.data.from_items(items).map_batches(
            _Writer,
            fn_constructor_kwargs={"gen": gen, "runtime": job.runtime, "models_dir": job.models_dir, "folder": folder},
            batch_size=gen.batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(gpus))),
            **resources,
        )
        rows = ds.take_all()
        failed = [r for r in rows if r["error"]]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(rows)} class images failed, e.g. {failed[0]['id']}: {failed[0]['error']}"
            )
        meta = gen.model_dump(mode="json") | {"weights": weights}
        atomic_write(join(folder, CACHE_INFO), json.dumps(meta, indent=2).encode())
    return ClassImages(folder, [join(folder, n) for n in names], len(missing), gen.model)
