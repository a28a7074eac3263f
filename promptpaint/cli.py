"""``promptpaint`` command line.

Exit codes: 0 ok (also when some rows failed: the summary says so), 1 the job failed,
2 invalid spec or arguments.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from promptpaint.config import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Bulk-edit images with prompts.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry and the tiny offline test set.")
app.add_typer(models_app, name="models")

EXIT_FAILED, EXIT_INVALID = 1, 2


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="EditSpec YAML file")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: key.path=value (YAML scalar)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list inputs, stages and pools; run nothing")] = False,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental",
            help="skip input paths already in the manifest without reading them (for scheduled runs over "
            "a growing folder); without it, every input is hashed and ids already done are skipped",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join (host:6379 or ray://host:10001) [default: RAY_ADDRESS, else a new local Ray]"
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show library and Ray worker logs (always in <output>/logs/)")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    wait_lock: Annotated[
        bool,
        typer.Option("--wait-lock", help="if another run holds the output's run lock, wait for it instead of exiting"),
    ] = False,
) -> None:
    """Run a bulk edit: detect -> segment -> inpaint every input, write images, masks and a manifest.

    One run at a time per output: a second one finds the run lock (<output>/_RUN_LOCK) and exits 1 without
    processing anything (or waits, with --wait-lock); a lock whose lease expired is taken over."""
    from promptpaint.config import load_edit_spec

    try:
        edit = load_edit_spec(spec, [*(set_ or []), *([f"runtime.address={address}"] if address else [])])
    except SpecError as e:
        raise _fail(str(e), EXIT_INVALID) from None

    from promptpaint.jobs.bulk_edit import (
        JobFailed,
        RayJobError,
        all_done,
        describe_plan,
        format_summary,
        local_shape,
        nothing_new,
        prepare,
        run_job,
    )
    from promptpaint.jobs.lock import RunLock, RunLocked
    from promptpaint.jobs.logs import captured
    from promptpaint.jobs.ray_runtime import RayUnavailable, ensure_ray, resolve_address
    from promptpaint.lineage import LineageUnavailable
    from promptpaint.models import ModelNotAvailable

    if dry_run:
        try:
            typer.echo(describe_plan(edit))
        except (SpecError, FileNotFoundError) as e:
            raise _fail(str(e), EXIT_INVALID) from None
        except ModelNotAvailable as e:
            raise _fail(str(e), EXIT_FAILED) from None
        return
    try:
        preload = ("transformers", "diffusers", *(("ray", "ray.data") if edit.runtime.executor == "ray" else ()))
        preload += ("comet_ml",) if edit.lineage.mode != "off" else ()
        if edit.runtime.executor == "local" or resolve_address(edit.runtime.address) is None:
            prepared = prepare(edit, local_shape())  # this machine runs it: every spec problem before Ray starts
            if incremental:  # nothing new: seconds, without Ray, models, a Comet experiment or the lock
                t0 = time.perf_counter()
                done = all_done(prepared.spec)
                if done is not None:
                    typer.echo(format_summary(nothing_new(prepared.spec, done, t0)))
                    return
        with RunLock(edit.output).acquire(wait=wait_lock), captured(edit.output, verbose, preload) as log:
            if edit.runtime.executor == "ray":
                ensure_ray(edit.runtime.address, verbose=verbose)
                log.quiet()  # ray.init adds a terminal handler of its own
            result = run_job(edit, progress=progress, incremental=incremental, spec_path=str(spec))
    except RunLocked as e:
        raise _fail(str(e), EXIT_FAILED) from None
    except FileNotFoundError as e:
        raise _fail(f"input: {e}", EXIT_INVALID) from None
    except SpecError as e:  # found once the job looked at the cluster (e.g. fp16 on a CPU-only cluster)
        raise _fail(str(e), EXIT_INVALID) from None
    except RayJobError as e:  # the user's error first; Ray's wrapper only on request
        more = f"\n{e.detail}" if verbose else "\n(Ray's full error: run again with -v)"
        raise _fail(f"job failed: {e}{more}\n(no _SUCCESS written; re-run to resume)", EXIT_FAILED) from None
    except (JobFailed, RayUnavailable, ModelNotAvailable, LineageUnavailable, ValueError) as e:
        raise _fail(f"job failed: {e}\n(no _SUCCESS written; re-run to resume)", EXIT_FAILED) from None
    except Exception as e:  # noqa: BLE001 - a failed job is exit 1 with the reason, never a bare traceback
        raise _fail(f"job failed: {type(e).__name__}: {e}\n(no _SUCCESS written; re-run to resume)", EXIT_FAILED) from e
    typer.echo(format_summary(result))
    typer.echo(f"  log: {log.uri}")


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="training spec YAML (see examples/dreambooth.yaml)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: key.path=value (YAML scalar)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show workers, images, steps and memory; train nothing")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join [default: RAY_ADDRESS, else a new local Ray]"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library and Ray logs")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """DreamBooth-LoRA fine-tuning on Ray Train; re-running the same command resumes from the last checkpoint.

    Writes OUTPUT/pytorch_lora_weights.safetensors (load it with `--lora OUTPUT`, `inpaint.lora`, or diffusers'
    `pipe.load_lora_weights(OUTPUT)`), a model card (README.md), train.yaml and training.json.
    """
    from promptpaint.config import load_train_spec

    try:
        job = load_train_spec(spec, [*(set_ or []), *([f"runtime.address={address}"] if address else [])])
    except SpecError as e:
        raise _fail(str(e), EXIT_INVALID) from None

    from promptpaint.jobs.logs import captured
    from promptpaint.jobs.ray_runtime import RayUnavailable, ensure_ray
    from promptpaint.lineage import LineageUnavailable
    from promptpaint.models import ModelNotAvailable
    from promptpaint.training.job import TrainingFailed, describe_training, format_summary, run_training

    if dry_run:
        try:
            typer.echo(describe_training(job))
        except SpecError as e:
            raise _fail(str(e), EXIT_INVALID) from None
        return
    try:
        with captured(job.output, verbose, ("transformers", "diffusers", "ray", "ray.train", "comet_ml")) as log:
            ensure_ray(job.runtime.address, verbose=verbose)
            log.quiet()
            result = run_training(job, progress=progress, spec_path=str(spec))
    except SpecError as e:
        raise _fail(str(e), EXIT_INVALID) from None
    except (TrainingFailed, RayUnavailable, ModelNotAvailable, LineageUnavailable) as e:
        raise _fail(f"{e}\n(re-run the same command to resume from the last checkpoint)", EXIT_FAILED) from None
    except Exception as e:  # noqa: BLE001 - exit 1 with the reason, never a bare traceback
        raise _fail(f"training failed: {type(e).__name__}: {e}", EXIT_FAILED) from e
    typer.echo(format_summary(result))
    typer.echo(f"  log: {log.uri}")


@app.command()
def serve(
    spec: Annotated[Path | None, typer.Argument(help="serve spec YAML (see examples/serve.yaml)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: key.path=value (YAML scalar)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address [default: http.host, 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [default: http.port, 8000]")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="serve without a bearer token (logs a warning); never on a network")
    ] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join [default: a new local Ray]")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the pipeline over HTTP on Ray Serve: /v1/detect, /v1/segment, /v1/inpaint, /v1/edit, /v1/generate,
    a playground at /. Requests need `Authorization: Bearer $PROMPTPAINT_API_TOKEN` unless --insecure."""
    import time

    from promptpaint.config import load_serve_spec

    extra = [*([f"http.host={host}"] if host else []), *([f"http.port={port}"] if port else [])]
    try:
        spec_obj = load_serve_spec(spec, [*(set_ or []), *extra, *([f"runtime.address={address}"] if address else [])])
        from promptpaint.serve.app import build, read_token

        read_token(spec_obj, insecure)
    except (SpecError, PermissionError, OSError) as e:
        raise _fail(str(e), EXIT_INVALID) from None

    from ray import serve as ray_serve

    from promptpaint.jobs.ray_runtime import RayUnavailable, ensure_ray

    try:
        ensure_ray(spec_obj.runtime.address, verbose=verbose)
        ray_serve.start(http_options={"host": spec_obj.http.host, "port": spec_obj.http.port})
        ray_serve.run(build(spec_obj, insecure), name="promptpaint", route_prefix="/")
    except RayUnavailable as e:
        raise _fail(str(e), EXIT_FAILED) from None
    except Exception as e:  # noqa: BLE001
        raise _fail(f"serve failed: {type(e).__name__}: {e}", EXIT_FAILED) from e
    typer.echo(f"promptpaint serving on http://{spec_obj.http.host}:{spec_obj.http.port}/  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="the spec to run on the cluster (its paths: absolute or URIs)")],
    address: Annotated[
        str, typer.Option(envvar="RAY_API_SERVER_ADDRESS", help="the cluster's job API, e.g. http://HEAD:8265")
    ],
    command: Annotated[str, typer.Option(help="run | train")] = "run",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: key.path=value")] = None,
    slot: Annotated[
        str | None, typer.Option(help="schedule slot in the submission id [default: the UTC date, YYYYMMDD]")
    ] = None,
    incremental: Annotated[bool, typer.Option("--incremental", help="run: pass --incremental")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="stream the logs; exit with the job's status (0/1/2)")] = False,
    working_dir: Annotated[
        Path | None, typer.Option(help="folder shipped with the job (e.g. this repository when the image lacks it)")
    ] = None,
) -> None:
    """Submit a promptpaint command to a Ray cluster (Ray Job Submission). The submission id comes from the spec,
    the overrides and the slot: submitting the same thing twice in one slot starts one job."""
    from promptpaint.jobs.submit import follow
    from promptpaint.jobs.submit import submit as submit_job

    if not spec.is_file():
        raise _fail(f"spec file {str(spec)!r} does not exist", EXIT_INVALID)
    if command not in ("run", "train"):
        raise _fail(f"--command must be run or train, got {command!r}", EXIT_INVALID)
    extra = ["--incremental"] if incremental and command == "run" else []
    try:
        sub = submit_job(address, command, spec, list(set_ or []), slot, working_dir, extra)
    except (ConnectionError, OSError, RuntimeError, ValueError) as e:
        raise _fail(f"submit failed: {type(e).__name__}: {e}", EXIT_FAILED) from None
    what = "already submitted" if sub.existed else "submitted"
    typer.echo(f"{what}: {sub.submission_id} ({sub.status}) on {address}")
    if wait:
        raise typer.Exit(follow(address, sub.submission_id))


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts (quote each)")],
    out: Annotated[str, typer.Option("--out", help="output folder (or fsspec URI) for <id>.png + generate.jsonl")],
    model: Annotated[str | None, typer.Option(help="generate model from the registry [default: sd15]")] = None,
    models_dir: Annotated[
        str | None, typer.Option(envvar="PROMPTPAINT_MODELS_DIR", help="local weights folder")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="images per prompt")] = 1,
    seed: Annotated[int | None, typer.Option(help="base seed; per-image seeds derive from it [default: 0]")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps [default: 30]")] = None,
    guidance: Annotated[float | None, typer.Option(help="classifier-free guidance scale [default: 7.5]")] = None,
    width: Annotated[int | None, typer.Option(help="multiple of 8 [default: the model's native size]")] = None,
    height: Annotated[int | None, typer.Option(help="multiple of 8 [default: the model's native size]")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="negative prompt for every image")] = None,
    batch: Annotated[int | None, typer.Option(help="images per pipeline call [default: 4]")] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="LoRA to apply: a `promptpaint train` output folder or .safetensors (repeatable)"),
    ] = None,
    lora_scale: Annotated[
        list[float] | None, typer.Option("--lora-scale", help="scale of each --lora, in order [default: 1.0]")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16")
    ] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Text-to-image: write N images per prompt as DIR/<id>.png (settings in PNG text) + DIR/generate.jsonl.

    The id hashes (prompt, index, seed, model): re-running with the same arguments rewrites identical files.
    Exit 0 when at least one image was written (failures are listed), 1 when none was or the model is missing,
    2 for invalid arguments.
    """
    from promptpaint.config import GenerateSpec, RuntimeSpec, build_spec

    # Options left out fall back to GenerateSpec's defaults: one place holds them.
    given = dict(model=model, seed=seed, steps=steps, guidance_scale=guidance, width=width, height=height)
    given.update(negative_prompt=negative, batch=batch)
    try:
        scales = list(lora_scale or [])
        if len(scales) > len(lora or []):
            raise SpecError(f"--lora-scale given {len(scales)} times for {len(lora or [])} --lora")
        if lora:
            given["lora"] = [{"path": p, "scale": scales[k] if k < len(scales) else 1.0} for k, p in enumerate(lora)]
        spec = build_spec(GenerateSpec, {k: v for k, v in given.items() if v is not None}, source="arguments")
        runtime = build_spec(RuntimeSpec, {"device": device, "dtype": dtype}, source="arguments")
        runtime.resolve()
        if n < 1:
            raise SpecError(f"--n must be >= 1 (images per prompt), got {n}")
        for p in prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise SpecError(f"prompt {p!r} is not valid UTF-8 text") from None
        from promptpaint.models import check_task

        check_task(spec.model, "generate")
    except (SpecError, ValueError) as e:
        raise _fail(
            str(e).replace("generate.model=", "--model ").replace("generate.lora", "--lora"), EXIT_INVALID
        ) from None

    from promptpaint.jobs.generate import format_summary, run_generate
    from promptpaint.models import ModelNotAvailable

    try:
        result = run_generate(spec, runtime, list(prompts), n, out, models_dir, progress=progress)
    except ModelNotAvailable as e:
        raise _fail(str(e), EXIT_FAILED) from None
    except Exception as e:  # noqa: BLE001 - exit 1 with the reason, never a bare traceback
        raise _fail(f"generate failed: {type(e).__name__}: {e}", EXIT_FAILED) from e
    typer.echo(format_summary(result, out))
    if not result.written:
        raise typer.Exit(EXIT_FAILED)


@models_app.command("list")
def models_list(
    models_dir: Annotated[
        str | None, typer.Option(envvar="PROMPTPAINT_MODELS_DIR", help="local weights folder")
    ] = None,
) -> None:
    """Every registered model: task, hub id (or ultralytics asset), pinned revision, and whether it is available here."""
    from promptpaint.models import MODELS, is_available, source_label

    typer.echo(
        f"{'name':<16}{'task':<9}{'available':<11}{'hub id @ revision (ultralytics: asset from repo @ release)'}"
    )
    for name, e in MODELS.items():
        ok = "yes" if is_available(name, models_dir) else "no"
        typer.echo(f"{name:<16}{e.task:<9}{ok:<11}{source_label(e)}")


@models_app.command("build-tiny")
def models_build_tiny(
    directory: Annotated[Path, typer.Argument(help="folder to write the tiny random-weight models into")],
) -> None:
    """Build the tiny random-weight model set (for tests and the offline demo; outputs are noise)."""
    from promptpaint.tiny import build_tiny

    for folder in build_tiny(directory):
        typer.echo(f"built {folder}")


def main() -> None:
    try:
        app()
    except SpecError as e:  # pragma: no cover - commands handle their own; this is the last guard
        typer.secho(str(e), err=True, fg=typer.colors.RED)
        sys.exit(EXIT_INVALID)


if __name__ == "__main__":
    main()
