"""Row plumbing shared by every stage.

A batch is a ``dict[str, list]`` (one list entry per row). Ray Data hands numpy columns; ``as_lists``
turns them into lists and ``to_numpy_batch`` turns them back. A row is *active* while its ``status``
is the empty string; a stage that fails or finds nothing sets ``status`` (and the error columns) and
every later stage passes the row through untouched, so no row is ever dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

Batch = dict[str, list[Any]]

ERROR_COLUMNS = ("error_stage", "error_kind", "error_message")


# Hand-off encoding between processes (Ray Data pools). Ray turns a column whose rows are equally long lists
# into a 2-D array (and ragged ones into pickled objects), so structured columns would arrive in a shape that
# depends on the data. They cross as JSON text (``__json__<name>``), lists of equally shaped arrays as one
# stacked array (``__stack__<name>``); ``as_lists`` restores both exactly.
_JSON, _STACK = "__json__", "__stack__"


def as_lists(batch: dict[str, Any]) -> Batch:
    """Ray's numpy batch (or a dict of lists) -> dict of python lists (arrays stay arrays)."""
    out: Batch = {}
    for k, v in batch.items():
        if k.startswith(_JSON):
            out[k[len(_JSON) :]] = [json.loads(x) for x in v]
        elif k.startswith(_STACK):
            out[k[len(_STACK) :]] = [list(x) for x in v]
        else:
            out[k] = list(v)
    return out


def jsonable(v: Any) -> Any:
    """numpy values -> plain python (lists, ints, floats, strings) for JSON."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _is_array_list(values: list[Any]) -> bool:
    """Rows that are lists of arrays (at least one non-empty), every list's arrays of one shape."""
    seen = False
    for x in values:
        if not isinstance(x, list | tuple):
            return False
        if x:
            if not all(isinstance(a, np.ndarray) and a.shape == x[0].shape for a in x):
                return False
            seen = True
    return seen


def to_numpy_batch(batch: Batch, handoff: bool = False) -> dict[str, np.ndarray]:
    """dict of lists -> dict of 1-D numpy columns Ray Data accepts (ragged arrays become object columns).

    ``handoff``: the batch goes to another process that will call ``as_lists``: structured columns are
    encoded so they come back exactly as they left (see ``_JSON``).
    """
    out: dict[str, np.ndarray] = {}
    for k, v in batch.items():
        if handoff and any(isinstance(x, list | tuple | dict) for x in v):
            if _is_array_list(v):
                out[_STACK + k] = _object_column([np.stack(x) if len(x) else np.zeros((0,)) for x in v])
            else:
                out[_JSON + k] = np.asarray([json.dumps(jsonable(x)) for x in v], dtype=object)
        elif any(isinstance(x, np.ndarray | list | tuple) for x in v):
            out[k] = _object_column(v)
        else:
            out[k] = np.asarray(v)
    return out


def _object_column(v: list[Any]) -> np.ndarray:
    col = np.empty(len(v), dtype=object)
    for i, x in enumerate(v):  # element-wise: numpy would broadcast or reject ragged rows
        # Python lists stay lists (Ray stores them as objects): as numpy arrays, string lists
        # would become fixed-width tensors that Ray cannot unify across blocks.
        col[i] = list(x) if isinstance(x, tuple) else x
    return col


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Consecutive slices of at most ``size`` rows (of any batch: a listing's, before ``id`` exists, too)."""
    n = len(next(iter(batch.values()), ()))
    if n <= size:
        return [batch]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def concat_batches(parts: list[Batch]) -> Batch:
    """Inverse of ``split_batch``: every part went through the same stage, so they share their columns."""
    if len(parts) == 1:
        return parts[0]
    keys = list(parts[0])
    if any(list(p) != keys and set(p) != set(keys) for p in parts):
        raise ValueError(f"stage outputs disagree on columns: {[sorted(p) for p in parts]}")
    return {k: [x for p in parts for x in p[k]] for k in keys}


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


def load_stage_model(stage: str, name: str, runtime: Any, models_dir: str | None) -> tuple:
    """Device and dtype from ``runtime``, the registry model ``name`` checked to be a ``stage`` model, and the
    stage backend of its family (``FAMILIES[entry.family].backend``) -> (device, dtype, LoadedModel, backend)."""
    from promptpaint.models import FAMILIES, load_model

    device, dtype = runtime.resolve()
    loaded = load_model(name, models_dir, device, dtype, task=stage)
    family = FAMILIES[loaded.entry.family]
    if family.backend is None:
        raise ValueError(f"model family {family.name!r} has no {stage} stage backend")
    return device, dtype, loaded, family.backend(loaded, device, dtype)


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


# Where promptpaint's own code lives: an exception raised here is our bug, not the model's.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


_MODEL_LIBRARIES = frozenset({"torch", "transformers", "diffusers", "ultralytics", "peft", "accelerate"})


def error_kind(exc: BaseException) -> str:
    """``internal_error`` when promptpaint's own code raised ``exc``, else ``model_error``.

    Judged by the frame that raised it: an exception from inside torch / transformers / diffusers /
    ultralytics (a CUDA out-of-memory, a shape the model rejects) is a model error; a TypeError in a
    stage is a bug, and must not hide among model errors (the job's error-rate breaker names it).
    """
    if isinstance(exc, MemoryError) or type(exc).__module__.split(".")[0] in _MODEL_LIBRARIES:
        return "model_error"  # e.g. torch.OutOfMemoryError raised by a tensor op in a stage's own lines
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is not None and last.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        return "internal_error"
    return "model_error"


def run_with_fallback(
    batch: Batch,
    rows: list[int],
    stage: str,
    fn: Callable[[list[int]], None],
) -> None:
    """Run ``fn`` on all rows at once; if that raises, retry row by row so one bad row fails alone.

    ``fn(rows)`` writes its results into ``batch`` only once it cannot fail any more (a retried row must
    not see half of an earlier attempt). A row that still fails on its own gets a ``model_error`` (or an
    ``internal_error``, see ``error_kind``) carrying the exception, and the rest of the batch goes on.
    """
    if not rows:
        return
    try:
        fn(rows)
        return
    except Exception as e:
        if len(rows) == 1:
            exc = traceback.format_exc(limit=3)
            set_error(batch, rows[0], stage, error_kind(e), exc.strip().splitlines()[-1] + "\n" + exc)
            return
    for i in rows:
        try:
            fn([i])
        except Exception as e:  # noqa: BLE001 - a per-row error column is the contract
            set_error(batch, i, stage, error_kind(e), f"{type(e).__name__}: {e}")
