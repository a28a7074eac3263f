"""Row plumbing shared by every stage.

A batch is a ``dict[str, list]`` (one list entry per row). Ray Data hands numpy columns; ``as_lists``
turns them into lists and ``to_numpy_batch`` turns them back. A row is *active* while its ``status``
is the empty string; a stage that fails or finds nothing sets ``status`` (and the error columns) and
every later stage passes the row through untouched, so no row is ever dropped.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

Batch = dict[str, list[Any]]

ERROR_COLUMNS = ("error_stage", "error_kind", "error_message")


def as_lists(batch: dict[str, Any]) -> Batch:
    """Ray's numpy batch (or a dict of lists) -> dict of python lists (arrays stay arrays)."""
    return {k: list(v) for k, v in batch.items()}


def to_numpy_batch(batch: Batch) -> dict[str, np.ndarray]:
    """dict of lists -> dict of 1-D numpy columns Ray Data accepts (ragged arrays become object columns)."""
    out: dict[str, np.ndarray] = {}
    for k, v in batch.items():
        if any(isinstance(x, np.ndarray | list | tuple) for x in v):
            col = np.empty(len(v), dtype=object)
            for i, x in enumerate(v):  # element-wise: numpy would broadcast or reject ragged rows
                # Python lists stay lists (Ray stores them as objects): as numpy arrays, string lists
                # would become fixed-width tensors that Ray cannot unify across blocks.
                col[i] = list(x) if isinstance(x, tuple) else x
            out[k] = col
        else:
            out[k] = np.asarray(v)
    return out


def num_rows(batch: Batch) -> int:
    return len(batch["id"])


def active(batch: Batch) -> list[int]:
    return [i for i, s in enumerate(batch["status"]) if not s]


def ensure_column(batch: Batch, name: str, default: Callable[[], Any]) -> list[Any]:
    if name not in batch:
        batch[name] = [default() for _ in range(num_rows(batch))]
    return batch[name]


def set_error(batch: Batch, i: int, stage: str, kind: str, message: str) -> None:
    batch["status"][i] = "error"
    batch["error_stage"][i] = stage
    batch["error_kind"][i] = kind
    batch["error_message"][i] = message[:2000]


def new_rows(ids: Sequence[str], paths: Sequence[str]) -> Batch:
    n = len(ids)
    return {
        "id": list(ids),
        "path": list(paths),
        "status": [""] * n,
        "error_stage": [""] * n,
        "error_kind": [""] * n,
        "error_message": [""] * n,
    }


def load_stage_model(stage: str, name: str, runtime: Any, models_dir: str | None, backends: dict[str, Any]) -> tuple:
    """Device and dtype from ``runtime``, the registry model ``name`` checked to be a ``stage`` model, and the
    backend its family registered in ``backends`` -> (device, dtype, LoadedModel, backend)."""
    from promptpaint.models import load_model

    device, dtype = runtime.resolve()
    loaded = load_model(name, models_dir, device, dtype, task=stage)
    family = loaded.entry.family
    if family not in backends:
        raise ValueError(f"no {stage} backend for model family {family!r}; known: {sorted(backends)}")
    return device, dtype, loaded, backends[family](loaded, device, dtype)


def derive_seed(spec_seed: int, row_id: str) -> int:
    """Per-image seed from the spec seed and the image id: independent of batch position and worker."""
    digest = hashlib.sha256(f"{spec_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def timed(batch: Batch, stage: str, rows: Sequence[int]) -> Iterator[None]:
    """Charge the wall time of a block to ``t_<stage>_ms`` of the rows it served, split evenly."""
    col = ensure_column(batch, f"t_{stage}_ms", lambda: 0.0)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if rows:
            share = (time.perf_counter() - t0) * 1000.0 / len(rows)
            for i in rows:
                col[i] += share


def run_with_fallback(
    batch: Batch,
    rows: list[int],
    stage: str,
    fn: Callable[[list[int]], None],
) -> None:
    """Run ``fn`` on all rows at once; if that raises, retry row by row so one bad row fails alone.

    ``fn(rows)`` writes its results into ``batch``. A row that still fails on its own gets a
    ``model_error`` carrying the exception, and the rest of the batch goes on.
    """
    if not rows:
        return
    try:
        fn(rows)
        return
    except Exception:
        if len(rows) == 1:
            exc = traceback.format_exc(limit=3)
            set_error(batch, rows[0], stage, "model_error", exc.strip().splitlines()[-1] + "\n" + exc)
            return
    for i in rows:
        try:
            fn([i])
        except Exception as e:  # noqa: BLE001 - a per-row error column is the contract
            set_error(batch, i, stage, "model_error", f"{type(e).__name__}: {e}")
