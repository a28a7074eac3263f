"""The family table and the operations that dispatch over it: load, probe availability, build tiny.

Loading goes through one path whether the source is a local folder (``<models_dir>/<name>``) or a hub id, so
the random-weight set built by :func:`build_tiny` exercises exactly the code that loads real checkpoints.
Adding a family: one module with its :class:`Family`, one line in ``FAMILIES``, its entries in the registry.

No environment reads here (``config.py`` resolves ``PROMPTPAINT_MODELS_DIR``); ``HF_HUB_OFFLINE`` is honoured
by huggingface_hub / transformers / diffusers, ``YOLO_OFFLINE`` by ultralytics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError

from promptpaint.models import clip, owl, sam, sd, sdxl, ultralytics_sam, yolo_world
from promptpaint.models.base import Family, LoadedModel, ModelNotAvailable, cached_commit
from promptpaint.models.registry import MODELS, ModelEntry, check_task, get_entry, resolve_source, source_label
from promptpaint.models.tiny import TINY_MARKER, replace_dir
from promptpaint.models.ultralytics import ultralytics_asset_path, ultralytics_fix

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        owl.OWLV2,
        owl.OWLVIT,
        sam.SAM,
        yolo_world.YOLO_WORLD,
        ultralytics_sam.ULTRALYTICS_SAM,
        ultralytics_sam.FASTSAM,
        sd.SD_INPAINT,
        sd.SD,
        sdxl.SDXL_INPAINT,
        sdxl.SDXL,
        clip.CLIP,
    )
}


def load_model(
    name: str, models_dir: str | None, device: torch.device, dtype: torch.dtype, task: str | None = None
) -> LoadedModel:
    """Load ``name`` from ``models_dir/name`` if present, else from the hub at the pinned revision.

    ``task`` (detect | segment | inpaint) checks the entry first. Raises ModelNotAvailable (with the fix)
    when neither place has the weights; other errors propagate.
    """
    entry = check_task(name, task) if task else get_entry(name)
    family = FAMILIES[entry.family]
    source, is_local = resolve_source(name, models_dir)
    requested = None if is_local else entry.revision
    try:
        processor, model, commit = family.load(entry, source, requested, dtype)
    # transformers / diffusers / huggingface_hub report missing files and offline misses as these.
    except (OSError, EntryNotFoundError) as e:
        raise _not_available(entry, models_dir, is_local, e) from e
    model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()  # pipelines have no eval(); diffusers already loads their modules in eval mode
    if commit is None and not is_local:
        commit = cached_commit(entry.hub_id, family.probe_files[0], entry.revision)
    revision = "local" if is_local else (commit or entry.revision)
    return LoadedModel(entry=entry, source=source, revision=revision, processor=processor, model=model)


def is_available(name: str, models_dir: str | None) -> bool:
    """True if ``models_dir/name`` exists or the pinned checkpoint's config files are in the HF cache (and, for
    ultralytics families, the asset file is where ultralytics looks: working directory or its weights dir).

    Never touches the network.
    """
    entry = get_entry(name)
    if resolve_source(name, models_dir)[1]:
        return True
    if entry.asset is not None and ultralytics_asset_path(entry.asset) is None:
        return False
    return all(
        isinstance(try_to_load_from_cache(entry.hub_id, f, revision=entry.revision), str)
        for f in FAMILIES[entry.family].probe_files
    )


def _not_available(
    entry: ModelEntry, models_dir: str | None, is_local: bool, cause: BaseException
) -> ModelNotAvailable:
    looked = str(Path(models_dir) / entry.name) if models_dir is not None else "<no models_dir set>"
    first_line = (str(cause).splitlines() or [""])[0][:300]
    if entry.asset is None:
        hub = f"on the hub for {entry.hub_id}@{entry.revision or 'main'}"
    else:
        hub = f"for {source_label(entry)} where ultralytics looks"
    where = f"found {looked} but could not load it" if is_local else f"looked in {looked} (no such folder) and {hub}"
    remote = (
        "unset HF_HUB_OFFLINE and make sure the hub is reachable (or the checkpoint is in the HF cache)"
        if entry.asset is None
        else ultralytics_fix(entry)
    )
    return ModelNotAvailable(
        f"model {entry.name!r} is not available: {where} ({type(cause).__name__}: {first_line}).\n"
        "Fix one of: set models_dir (or PROMPTPAINT_MODELS_DIR) to a folder containing a complete "
        f"'{entry.name}/'; {remote}; or run `promptpaint models build-tiny DIR` and point models_dir at DIR for the "
        "random-weight test set."
    )


def build_tiny(models_dir: str | Path, names: list[str] | None = None, seed: int = 0) -> list[Path]:
    """Build random-weight miniatures into ``models_dir/<name>`` and return the folders.

    Each is built from a config by its family (``Family.build_tiny``) and saved with the library's own
    ``save_pretrained`` (or the ultralytics checkpoint format) into the folder :func:`load_model` loads first.
    Deterministic: each model is initialised right after ``torch.manual_seed(seed)``, so rebuilding gives
    identical weights. Each folder is written to a temp dir first and swapped in, so a crash never leaves
    a half-written model that :func:`resolve_source` would pick up.
    """
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    entries = [get_entry(n) for n in (names if names is not None else list(MODELS))]
    out = []
    for entry in entries:
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the final folder should be readable like any other
        for obj in FAMILIES[entry.family].build_tiny(entry):
            obj.save_pretrained(tmp)
        marker = {"name": entry.name, "family": entry.family, "seed": seed, "stands_in_for": entry.hub_id}
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        target = root / entry.name
        replace_dir(tmp, target)
        out.append(target)
    return out
