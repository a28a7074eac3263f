"""A run lock in the output storage: overlapping scheduled runs never process the same images twice.

``<output>/_RUN_LOCK`` holds who owns the output and until when (a lease). The owner renews the lease from a
heartbeat thread and deletes the file when the run ends (also on errors); a lock whose lease expired (its
owner was killed, its node lost) is taken over, and so is one whose owner ran on this host and is gone. The manifest stays the only state: the lock says nothing about
which inputs are done.

Creating the file is atomic where the storage allows it: local and POSIX-like filesystems create it with
``O_EXCL`` (``open(path, "x")``), so of two runs starting at once exactly one wins. Object stores without an
exclusive create (S3 through s3fs) get write-then-read-back: both writers write, the file holds one of them,
and the one who reads someone else's token backs off; a race within the same few milliseconds is the
remaining window there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from promptpaint.io import atomic_write, join

LOCK_NAME = "_RUN_LOCK"
log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another live run holds the output's lock."""

    def __init__(self, uri: str, holder: dict[str, Any]):
        until = datetime.fromtimestamp(float(holder.get("expires", 0)), UTC).strftime("%H:%M:%S UTC")
        super().__init__(
            f"another run holds {uri}: {holder.get('owner', '?')} (started {holder.get('started', '?')}, lease "
            f"until {until}, renewed while it runs). Nothing was processed; re-run later, or with --wait-lock"
        )
        self.holder = holder


@dataclass
class RunLock:
    output: str
    lease_s: float = 120.0
    heartbeat_s: float = 30.0

    def __post_init__(self) -> None:
        self.uri = join(self.output, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # -- the file ---------------------------------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"token": self.token, "owner": self.owner, "expires": now + self.lease_s,
                           "started": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()  # fmt: skip

    def read(self) -> dict[str, Any] | None:
        fs, path = fsspec.core.url_to_fs(self.uri)
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # a half-written record of a dead writer: treat as expired
            return {"expires": 0}

    def _create(self) -> bool:
        """Create the lock file if absent; True if this call created it (and so holds the lock)."""
        fs, path = fsspec.core.url_to_fs(self.uri)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
            return True
        if fs.exists(path):
            return False
        fs.pipe_file(path, self._record())
        time.sleep(0.05)
        held = self.read()
        return bool(held and held.get("token") == self.token)

    # -- acquire / release --------------------------------------------------------------------------------------
    def acquire(self, wait: bool = False, poll_s: float = 2.0, timeout_s: float | None = None) -> RunLock:
        """Take the lock (taking over an expired one); RunLocked if a live run holds it (unless ``wait``)."""
        t0 = time.monotonic()
        while True:
            if self._create():
                break
            holder = self.read()
            if holder is None:
                continue  # released between our create and read: try again
            if float(holder.get("expires", 0)) < time.time() or self._owner_dead(holder):
                log.warning("taking over the stale run lock of %s (%s)", holder.get("owner", "?"), self.uri)
                self._delete_if(holder.get("token"))
                continue
            if not wait or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
                raise RunLocked(self.uri, holder)
            time.sleep(poll_s)
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="promptpaint-run-lock", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _owner_dead(holder: dict[str, Any]) -> bool:
        """The holder ran on this host and its process is gone (a killed run re-run at once need not wait out
        the lease). Other hosts' owners are judged by their lease only."""
        host, _, pid = str(holder.get("owner", "")).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _delete_if(self, token: str | None) -> None:
        fs, path = fsspec.core.url_to_fs(self.uri)
        held = self.read()
        if held is not None and held.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self.read()
            if not held or held.get("token") != self.token:
                log.error("lost the run lock %s (taken over by %s)", self.uri, (held or {}).get("owner"))
                return
            atomic_write(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            self._delete_if(self.token)
            self.held = False

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
