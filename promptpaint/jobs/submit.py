"""``promptpaint submit``: run a promptpaint command on a Ray cluster through the Ray Job Submission API.

The submission id is deterministic: ``promptpaint-<command>-<hash of the spec + overrides>-<slot>``, the slot being
the schedule's time slot (default: the UTC date, for nightly runs). A retried submit (a cron that fired twice, a
CI step re-run) finds the job with that id and reports or follows it instead of starting a second one.

The spec travels in the job's ``working_dir`` (with ``--working-dir``, a whole folder, e.g. this repository for a
cluster whose image lacks promptpaint); paths inside the spec should be absolute or URIs (``s3://...``): the job
runs on the cluster, where this machine's relative paths mean nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

COMMANDS = ("run", "train")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submitted:
    submission_id: str
    status: str
    existed: bool  # the id was already known to the cluster: nothing new was started


def submission_id(command: str, spec_text: str, overrides: list[str], slot: str) -> str:
    blob = "\0".join([command, spec_text, *overrides])
    safe_slot = "".join(c if c.isalnum() or c in "-_" else "-" for c in slot)[:40]
    return f"promptpaint-{command}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}-{safe_slot}"


def default_slot() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")


def submit(
    address: str,
    command: str,
    spec: Path,
    overrides: list[str],
    slot: str | None = None,
    working_dir: Path | None = None,
    extra_args: list[str] | None = None,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Submitted:
    """Submit (or find) the job; returns its id and status."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    text = spec.read_text(encoding="utf-8")
    sid = submission_id(command, text, overrides, slot or default_slot())
    client = JobSubmissionClient(address)
    existing = _status(client, sid)
    if existing is not None:
        return Submitted(sid, existing, True)
    tmp = Path(tempfile.mkdtemp(prefix="promptpaint-submit-"))
    try:
        if working_dir is not None:
            shutil.copytree(working_dir, tmp / "wd", ignore=shutil.ignore_patterns(
                ".git", ".venv", "__pycache__", ".models", "demo", "runs", ".cache", "*.egg-info"))  # fmt: skip
        else:
            (tmp / "wd").mkdir()
        shutil.copy(spec, tmp / "wd" / "promptpaint-spec.yaml")
        args = [command, "promptpaint-spec.yaml", *[x for o in overrides for x in ("--set", o)], "--no-progress"]
        args += list(extra_args or [])
        entrypoint = "python -m promptpaint.cli " + " ".join(shlex.quote(a) for a in args)
        runtime_env: dict[str, Any] = {"working_dir": str(tmp / "wd")}
        if pip:
            runtime_env["pip"] = list(pip)
        if env:
            runtime_env["env_vars"] = dict(env)
        for attempt in range(30):  # a head that just started has no job agent yet: "try again later"
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                                  metadata={"promptpaint.command": command, "promptpaint.spec": spec.name})  # fmt: skip
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or attempt == 29:
                    raise
                time.sleep(2)
    except RuntimeError as e:  # a concurrent submit with the same id won the race: that job is ours too
        if "already exists" not in str(e):
            raise
        return Submitted(sid, _status(client, sid) or "PENDING", True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Submitted(sid, _status(client, sid) or "PENDING", False)


def _status(client: Any, sid: str) -> str | None:
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError as e:  # the SDK raises RuntimeError for an unknown id
        if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
            return None
        raise


def follow(address: str, sid: str, stream: Any = None, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; the exit code ``promptpaint`` itself would give (0, 1, 2)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    out = stream or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            out.write(lines)
            out.flush()

    with contextlib.suppress(Exception):  # log streaming is best effort; the status below decides
        asyncio.run(tail())
    while True:
        info = client.get_job_info(sid)
        status = str(info.status.value)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return 2 if code == 2 else 1
