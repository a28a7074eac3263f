"""Which weights a model name would load, as a short string, so an output's identity can include it.

Without it, re-running a spec with real weights into an output made with the tiny set (or another fine-tune)
would skip every image as already done. A local folder is hashed by content, but only the head and tail of
large files, so a multi-GB checkpoint costs milliseconds; two fine-tunes of one base differ throughout their
tensors, so they differ there too. A hub load is named by its pinned revision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from promptpaint.models.registry import ULTRALYTICS_ASSETS, get_entry, resolve_source

WHOLE_FILE_LIMIT = 4 << 20  # files below this are hashed whole
EDGE_BYTES = 1 << 20  # larger files: this much of the head and of the tail


def folder_digest(folder: Path) -> str:
    """sha256 hex over the folder's files: sorted relative paths, sizes, and (partial) contents.

    Hidden paths (any part starting with ".") are skipped: download caches and lock files hold timestamps,
    not weights. Links are followed, so a folder of links to a snapshot hashes like the snapshot.
    """
    digest = hashlib.sha256()
    files = sorted(
        (p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    for rel, path in files:
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size < WHOLE_FILE_LIMIT:
                digest.update(f.read())
            else:
                digest.update(f.read(EDGE_BYTES))
                f.seek(size - EDGE_BYTES)
                digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(name: str, models_dir: str | None) -> str:
    """Identify the weights :func:`load_model` would load for ``name``; reads local files only.

    - local folder ``<models_dir>/<name>``: ``local:sha256:<16 hex>`` of :func:`folder_digest` (a copy of the
      folder elsewhere gives the same value);
    - hub: ``hub:<hub_id>@<pinned revision>``;
    - ultralytics asset: ``hub:ultralytics/assets/<asset>@<release>``, plus ``+sha256:<12 hex>`` of the file
      when it is where ultralytics looks (the file loaded, as in ``LoadedModel.revision``), plus
      ``;<hub_id>@<revision>`` for YOLO-World's CLIP text tower.
    """
    entry = get_entry(name)
    source, is_local = resolve_source(name, models_dir)
    if is_local:
        return f"local:sha256:{folder_digest(Path(source))[:16]}"
    hub = f"{entry.hub_id}@{entry.revision}"
    if entry.asset is None:
        return f"hub:{hub}"
    # Only ultralytics knows its weights dir. Imported here, not at module level, to keep this module light; its
    # import makes one DNS probe unless YOLO_OFFLINE is set, the same import load_model makes for this entry.
    from promptpaint.models.ultralytics import sha256_prefix, ultralytics_asset_path

    out = f"hub:{ULTRALYTICS_ASSETS}/{entry.asset}@{entry.asset_release}"
    found = ultralytics_asset_path(entry.asset)
    if found is not None:
        out += f"+sha256:{sha256_prefix(found)}"
    if entry.hub_id != ULTRALYTICS_ASSETS:
        out += f";{hub}"
    return out
