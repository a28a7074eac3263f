"""LoRA files as promptpaint uses them: find, inspect (architecture, content hash, training run), check, load.

A LoRA is a folder holding ``pytorch_lora_weights.safetensors`` (what ``promptpaint train`` writes and what
diffusers' ``load_lora_weights`` reads) or the ``.safetensors`` file itself, on a local path or an fsspec URI.
Inspection reads only the safetensors header (8-byte length + JSON), so ``config.py`` checks a LoRA against the
spec's model when the spec is parsed, without torch: an SDXL LoRA in an SD 1.5 pipeline is a spec error naming
both, not a shape error deep inside diffusers (or, worse, a LoRA that loads and changes nothing).

The architecture comes from the metadata ``promptpaint train`` writes (``promptpaint`` key), else from the
LoRA's shapes: the cross-attention key projection's input width is the text-embedding width, 768 for SD 1.x,
1024 for SD 2.x, 2048 for SDXL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

LORA_FILE = "pytorch_lora_weights.safetensors"
META_KEY = "promptpaint"  # safetensors metadata key holding the training run's lineage (JSON)
ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


class LoraError(ValueError):
    """A LoRA that cannot be used as given: missing, unreadable, or made for another architecture."""


class LoraNotFound(LoraError):
    """No LoRA file where the path points."""


@dataclass(frozen=True)
class LoraInfo:
    path: str  # as given (folder or file)
    file: str  # the .safetensors file (local path or URI)
    sha256: str  # of the file's bytes: the content identity recorded in manifests and PNG text
    arch: str | None  # sd1 | sd2 | sdxl, None when neither metadata nor shapes tell
    components: tuple[str, ...]  # unet, text_encoder, text_encoder_2
    run: dict[str, Any] = field(default_factory=dict)  # promptpaint metadata: base, run name, spec hash, ...

    def lineage(self, scale: float) -> dict[str, Any]:
        """What an output made with this LoRA records about it (manifest column, PNG text)."""
        run = {k: self.run[k] for k in ("run_name", "spec_hash", "base_model", "experiment_key") if k in self.run}
        return {"path": self.path, "sha256": self.sha256, "scale": scale, "arch": self.arch, **run}


def lora_file(path: str) -> str:
    """The ``.safetensors`` file a LoRA path names: the path itself, or ``<folder>/pytorch_lora_weights.safetensors``."""
    return path if path.endswith(".safetensors") else posixpath.join(path.rstrip("/"), LORA_FILE)


def read_header(file: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor name -> {dtype, shape, ...}, metadata) from a safetensors file's header; LoraError if unreadable."""
    try:
        with fsspec.open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LoraError(f"{file} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT:
                raise LoraError(f"{file} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise LoraNotFound(f"no LoRA at {file}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{file} is not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    return header, meta


def infer_arch(tensors: dict[str, Any], meta: dict[str, str]) -> str | None:
    """sd1 | sd2 | sdxl from promptpaint's metadata, else from the shapes (see the module docstring)."""
    run = _run_meta(meta)
    if run.get("arch") in ARCH_NAMES:
        return str(run["arch"])
    if any(k.startswith("text_encoder_2.") or "add_embedding" in k for k in tensors):
        return "sdxl"
    for name, info in tensors.items():
        if "attn2" in name and "to_k" in name and ("lora_A" in name or "lora.down" in name or "lora_down" in name):
            width = int(info["shape"][-1])
            return _CROSS_ATTN_WIDTH.get(width)
    return None


def _run_meta(meta: dict[str, str]) -> dict[str, Any]:
    try:
        run = json.loads(meta.get(META_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return run if isinstance(run, dict) else {}


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_CACHE: dict[tuple[str, Any], LoraInfo] = {}


def inspect_lora(path: str) -> LoraInfo:
    """Header, architecture and content hash of the LoRA at ``path`` (cached per file version)."""
    file = lora_file(path)
    fs, fpath = fsspec.core.url_to_fs(file)
    try:
        st = fs.info(fpath)
    except FileNotFoundError:
        hint = "" if path.endswith(".safetensors") else f" (a LoRA folder holds {LORA_FILE})"
        raise LoraNotFound(f"no LoRA at {path}: {file} does not exist{hint}") from None
    key = (file, (st.get("size"), st.get("mtime") or st.get("LastModified") or st.get("ETag")))
    if key not in _CACHE:
        tensors, meta = read_header(file)
        components = tuple(sorted({k.split(".", 1)[0] for k in tensors}))
        _CACHE[key] = LoraInfo(path, file, _sha256(file), infer_arch(tensors, meta), components, _run_meta(meta))
    return _CACHE[key]


def check_lora(path: str, model: str, field_name: str) -> LoraInfo:
    """``inspect_lora`` plus the architecture check against registry model ``model``; LoraError names both."""
    from promptpaint.models.registry import get_entry  # pure data

    try:
        info = inspect_lora(path)
    except LoraError as e:
        raise type(e)(f"{field_name}: {e}") from None
    entry = get_entry(model)
    if entry.arch is None:
        raise LoraError(f"{field_name}: model {model!r} is not a diffusion pipeline; LoRAs apply to sd/sdxl models")
    if info.arch is not None and info.arch != entry.arch:
        base = f", trained on {info.run['base_model']}" if info.run.get("base_model") else ""
        raise LoraError(
            f"{field_name}: {path} is an {ARCH_NAMES[info.arch]} LoRA{base}; the model {model!r} is "
            f"{ARCH_NAMES[entry.arch]}. Use a LoRA trained on an {ARCH_NAMES[entry.arch]} base "
            "(inpainting and text-to-image models of one architecture share LoRAs)"
        )
    return info


def local_file(info: LoraInfo) -> Path:
    """A local path to the LoRA file (remote files are copied once into a cache keyed by their hash)."""
    fs, fpath = fsspec.core.url_to_fs(info.file)
    if "file" in fs.protocol or fs.protocol == "local":
        return Path(fpath)
    cache = Path(os.environ.get("PROMPTPAINT_CACHE", Path(tempfile.gettempdir()) / "promptpaint-cache")) / "lora"
    target = cache / f"{info.sha256}.safetensors"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.part")
        fs.get(fpath, str(tmp))
        tmp.replace(target)
    return target


def apply_loras(pipe: Any, loras: list[tuple[str, float]], model: str, field_name: str) -> list[dict[str, Any]]:
    """Load ``(path, scale)`` LoRAs into a diffusers pipeline as adapters ``lora0, lora1, ...`` and activate them
    with their scales; returns each one's lineage. A LoRA whose keys match no layer of the pipeline is an error
    (diffusers only warns and the outputs stay unchanged)."""
    if not loras:
        return []
    _quiet_missing_component_warning()
    names, scales, lineage = [], [], []
    for k, (path, scale) in enumerate(loras):
        info = check_lora(path, model, f"{field_name}[{k}]")
        file = local_file(info)
        name = f"lora{k}"
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        if name not in _adapters(pipe):
            raise LoraError(f"{field_name}[{k}]: {path} matched no layer of {model!r}; it would change nothing")
        names.append(name)
        scales.append(scale)
        lineage.append(info.lineage(scale))
    pipe.set_adapters(names, adapter_weights=scales)
    return lineage


def _adapters(pipe: Any) -> set[str]:
    found: set[str] = set()
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        found |= set(getattr(module, "peft_config", None) or {})
    return found


class _DropNoKeysWarning(logging.Filter):
    """diffusers warns "No LoRA keys associated to CLIPTextModel found" for every UNet-only LoRA; apply_loras
    checks what was actually loaded instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to" not in record.getMessage()


def _quiet_missing_component_warning() -> None:
    for name in ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoKeysWarning) for f in log.filters):
            log.addFilter(_DropNoKeysWarning())
