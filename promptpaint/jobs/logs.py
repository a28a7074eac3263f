"""A quiet terminal: library chatter goes to ``<output>/logs/<run>.log``, the terminal keeps the bar and summary.

Ray's warnings, transformers' / diffusers' / huggingface_hub's messages, Comet's offline notes and Python
warnings are logged to the file; with ``-v`` they also reach the terminal (and Ray workers' output is
forwarded, see ``ray_runtime.ensure_ray``). A remote output gets its log uploaded when the run ends.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator

from promptpaint.io import atomic_write, join, local_path

# Loggers that print on their own (own StreamHandler, or propagate to the root's default one).
CHATTY = ("ray", "ray.data", "ray.train", "transformers", "diffusers", "huggingface_hub", "comet_ml", "ultralytics")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Capture:
    """The log file of a run; ``quiet()`` strips terminal handlers that libraries added since (``ray.init``
    installs its own on the ``ray`` logger)."""

    def __init__(self, uri: str, verbose: bool):
        self.uri, self.verbose = uri, verbose

    def quiet(self) -> None:
        if self.verbose:
            return
        for name in CHATTY:
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = False


@contextlib.contextmanager
def captured(output: str, verbose: bool = False, preload: tuple[str, ...] = ()) -> Iterator[Capture]:
    """Route library logging and warnings to a log file under ``<output>/logs/`` for the duration.

    ``preload``: modules to import first, so that the handlers they install at import time are routed too.
    """
    for mod in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    local_dir = local_path(join(output, "logs"))
    tmp = None
    if local_dir is None:  # remote output: write locally, upload at the end
        tmp = tempfile.mkdtemp(prefix="promptpaint-log-")
        local_dir = tmp
    os.makedirs(local_dir, exist_ok=True)
    file_path = os.path.join(local_dir, name)
    handler = logging.FileHandler(file_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    for logger_name in CHATTY:
        lg = logging.getLogger(logger_name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
        lg.addHandler(handler)
        lg.propagate = verbose
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.addHandler(handler)
    py_warnings.propagate = verbose
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            capture = Capture(join(output, "logs", name), verbose)
            capture.quiet()
            yield capture
    finally:
        logging.captureWarnings(False)
        py_warnings.removeHandler(handler)
        py_warnings.propagate = True
        for lg, handlers, propagate, level in saved:
            lg.removeHandler(handler)
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.propagate, lg.level = propagate, level
        handler.close()
        if tmp is not None:
            with contextlib.suppress(Exception), open(file_path, "rb") as f:
                atomic_write(join(output, "logs", name), f.read())
