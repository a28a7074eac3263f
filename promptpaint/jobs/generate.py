"""Text-to-image job behind ``promptpaint generate``: prompts x n -> ``<out>/<id>.png`` + ``<out>/generate.jsonl``.

The image id is a short hash of (prompt, index, seed, model), so a re-run with the same arguments writes the
same files with the same bytes, and ``generate.jsonl`` holds one line per id (re-runs replace their lines
instead of appending duplicates). Everything else that shaped an image (negative prompt, steps, guidance,
size, model source and revision, LoRAs with their content hash and training run) is recorded in its PNG text chunks and its jsonl line.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from promptpaint.actors.generator import Generator
from promptpaint.config import GenerateSpec, RuntimeSpec
from promptpaint.io import atomic_write, encode_png

JSONL_NAME = "generate.jsonl"


@dataclass(frozen=True)
class GenRow:
    id: str
    prompt: str
    index: int  # 0..n-1 within its prompt


@dataclass
class GenerateResult:
    written: list[str] = field(default_factory=list)  # image paths, in row order
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, error message)


def image_id(prompt: str, index: int, seed: int, model: str) -> str:
    """16 hex chars of sha256 over (prompt, index, seed, model)."""
    blob = json.dumps([prompt, index, seed, model], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def settings_tag(spec: GenerateSpec, width: int, height: int) -> str:
    """8 hex chars over the settings that change pixels but not the noise (steps, guidance, size, negative).

    Part of the file name, so a re-run with other settings writes new files instead of replacing the
    earlier images, while the same (prompt, index, seed, model) still starts from the same noise.
    """
    settings: list[Any] = [spec.steps, spec.guidance_scale, width, height, spec.negative_prompt]
    if spec.lora:  # another LoRA (content) or scale: new files; without LoRAs the tags stay as they were
        from promptpaint.lora import inspect_lora

        settings.append([[inspect_lora(r.path).sha256, r.scale] for r in spec.lora])
    blob = json.dumps(settings, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:8]


def plan_rows(prompts: list[str], n: int, spec: GenerateSpec) -> list[GenRow]:
    """``n`` rows per prompt, in argument order; a prompt given twice yields its rows once."""
    rows, seen = [], set()
    for prompt in prompts:
        for k in range(n):
            rid = image_id(prompt, k, spec.seed, spec.model)
            if rid not in seen:
                seen.add(rid)
                rows.append(GenRow(rid, prompt, k))
    return rows


def _chunks(rows: list[GenRow], size: int) -> Iterator[list[GenRow]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _read_jsonl(uri: str) -> dict[str, str]:
    """file stem (id-settings) -> raw line of an existing generate.jsonl (empty if there is none)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return {}
    with fs.open(path, "rt", encoding="utf-8") as f:
        out = {}
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[f"{rec['id']}-{rec['settings']}"] = line.rstrip("\n")
        return out


def run_generate(
    spec: GenerateSpec,
    runtime: RuntimeSpec,
    prompts: list[str],
    n: int,
    out: str,
    models_dir: str | None = None,
    progress: bool = True,
) -> GenerateResult:
    """Generate ``n`` images per prompt into ``out`` (local folder or fsspec URI).

    Raises ModelNotAvailable (before any file is written) when the model cannot be loaded. A row the pipeline
    fails on is reported in the result and gets a jsonl line with ``status: "error"``; the others are written.
    """
    from tqdm.auto import tqdm

    rows = plan_rows(prompts, n, spec)
    gen = Generator(spec, runtime, models_dir)
    loaded = gen.loaded
    meta = {
        "model": spec.model,
        "source": loaded.source,
        "revision": str(loaded.revision),
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "spec_seed": spec.seed,
        "width": gen.width,
        "height": gen.height,
    }
    if gen.loras:
        meta["lora"] = gen.loras
    tag = settings_tag(spec, gen.width, gen.height)
    result = GenerateResult()
    lines = _read_jsonl(posixpath.join(out, JSONL_NAME))
    bar = tqdm(total=len(rows), unit="img", desc="generate", disable=not progress, file=sys.stderr)
    try:
        for chunk in _chunks(rows, spec.batch):
            batch: dict[str, list[Any]] = {
                "id": [r.id for r in chunk],
                "prompt": [r.prompt for r in chunk],
                "negative_prompt": [spec.negative_prompt] * len(chunk),
            }
            batch = gen(batch)
            for i, r in enumerate(chunk):
                record: dict[str, Any] = {
                    "id": r.id,
                    "file": f"{r.id}-{tag}.png",
                    "prompt": r.prompt,
                    "negative_prompt": spec.negative_prompt,
                    "index": r.index,
                    "seed": batch["seed"][i],
                    "settings": tag,
                    **meta,
                }
                if batch["status"][i]:
                    record.update(file=None, status="error", error=batch["error_message"][i].splitlines()[0])
                    result.failed.append((r.id, record["error"]))
                else:
                    path = posixpath.join(out, record["file"])
                    atomic_write(path, encode_png(batch["image"][i], text=_png_text(record)))
                    record["status"] = "ok"
                    result.written.append(path)
                lines[f"{r.id}-{tag}"] = json.dumps(record, ensure_ascii=False)
            bar.update(len(chunk))
    finally:
        bar.close()
        if lines:
            atomic_write(posixpath.join(out, JSONL_NAME), "".join(f"{v}\n" for v in lines.values()).encode("utf-8"))
    return result


def _png_text(record: dict[str, Any]) -> dict[str, str]:
    """PNG tEXt chunks: what produced the image (``promptpaint:<key>``), read back with io.read_png_text."""
    keys = ("id", "prompt", "negative_prompt", "index", "seed", "spec_seed", "model", "source", "revision")
    text = {f"promptpaint:{k}": str(record[k]) for k in (*keys, "steps", "guidance_scale", "width", "height")}
    if record.get("lora"):
        text["promptpaint:lora"] = json.dumps(record["lora"], sort_keys=True)
    return text


def format_summary(result: GenerateResult, out: str) -> str:
    lines = [f"generated {len(result.written)} image(s) in {out} (index: {posixpath.join(out, JSONL_NAME)})"]
    if result.failed:
        lines.append(f"{len(result.failed)} failed:")
        lines += [f"  {rid}: {msg}" for rid, msg in result.failed]
    return "\n".join(lines)
