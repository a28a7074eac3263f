"""An inpainting actor SIGKILLed mid-job: Ray restarts it and retries its tasks (at-least-once); the
driver's manifest must still hold every input exactly once, with no file lost, doubled or half-written.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
from reliability_kit import assert_exactly_once, audit, make_spec, map_workers, output_files, record, small_corpus

from promptpaint.jobs.bulk_edit import run_job


class ActorKiller:
    """``on_batch`` hook: after ``at`` rows have reached the driver, SIGKILL the running actor."""

    def __init__(self, at: tuple[int, ...]):
        self.at = list(at)
        self.rows = 0
        self.killed: list[int] = []
        self.pids_seen: set[int] = set()
        self.delivered: Counter[int] = Counter()

    def __call__(self, batch: dict) -> None:
        self.rows += batch["rows"]  # a task block's summary (its rows were written as a part on the worker)
        self.delivered[batch["block"]] += 1
        workers = map_workers()
        self.pids_seen |= set(workers)
        if self.at and self.rows >= self.at[0]:
            self.at.pop(0)
            live = [pid for pid in workers if pid not in self.killed]
            if live:  # the test asserts the number of kills
                os.kill(live[0], signal.SIGKILL)
                self.killed.append(live[0])


@pytest.mark.reliability
@pytest.mark.heavy
def test_actor_killed_mid_job_loses_and_duplicates_nothing(tmp_path, tiny_models, ray_session):
    inputs = small_corpus(tmp_path / "in", 28)
    out = str(tmp_path / "out")
    spec = make_spec(str(tmp_path / "in"), out, tiny_models, executor="ray")
    killer = ActorKiller(at=(8, 20))  # two kills: after the 2nd and the 5th batch of 4

    t0 = time.perf_counter()
    crash = None
    try:
        result = run_job(spec, progress=False, on_batch=killer)
    except Exception as e:  # recorded as a crash in the figures, then re-raised
        crash = e
    seconds = time.perf_counter() - t0
    a = audit(out, inputs)
    # Reference: the same spec in a plain loop, never interrupted (byte identity is the README's claim).
    ref_out = str(tmp_path / "ref")
    run_job(make_spec(str(tmp_path / "in"), ref_out, tiny_models, executor="local"), progress=False)
    same_bytes = output_files(out) == output_files(ref_out)
    redelivered = sum(n - 1 for n in killer.delivered.values())
    record(
        "Actor killed mid-job (Ray)",
        injected="SIGKILL to the inpainting actor after 8 and 20 rows reached the driver",
        tried=len(killer.killed),
        crashes=int(crash is not None),
        lost=a.lost,
        duplicated=a.duplicated,
        inputs=len(inputs),
        kills=len(killer.killed),
        actor_pids_seen=len(killer.pids_seen),
        blocks_redelivered_to_driver=redelivered,
        temp_files=a.temp_files,
        bytes_equal_to_uninterrupted_loop=same_bytes,
        seconds=round(seconds, 1),
    )

    if crash is not None:
        raise crash
    assert len(killer.killed) == 2, "the job ended before both kills: make the corpus larger"
    # Ray really replaced the actor: rows kept arriving from processes other than the killed ones.
    assert killer.pids_seen - set(killer.killed), f"no replacement actor seen: {killer.pids_seen}"
    assert_exactly_once(a)
    assert sum(result.counts.values()) == len(inputs)
    # Retried tasks rewrite the same names with the same bytes: nothing torn, nothing different.
    assert same_bytes
