"""Shared fixtures: offline environment, one tiny model set, one local Ray per session."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before anything imports transformers/diffusers/ultralytics/comet: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "promptpaint-yolo"))
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("PROMPTPAINT_MODELS_DIR", None)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1, reached through the environment a user sets for an S3-compatible store
    (AWS_ENDPOINT_URL and keys): set in this process while it runs, and yielded (a job's runtime env needs it).
    moto keeps its buckets in this process, shared by every server it starts: they are reset at start and end.
    (Import it as ``from conftest import moto_s3``.)"""
    import fsspec
    import httpx
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").clear_instance_cache()
    httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
    try:
        yield env
    finally:
        httpx.post(f"{endpoint}/moto-api/reset", timeout=10)
        fsspec.filesystem("s3").clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model set, built once and loaded through the real from_pretrained path."""
    from promptpaint.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny(folder)
    return folder


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def make_lora(folder: Path, models: Path, model: str = "sd15", seed: int = 0, scale: float = 0.5) -> Path:
    """A real diffusers-format LoRA without training: peft adapters with random (non-zero) up-projections,
    exported the way ``promptpaint train`` exports (so it changes the pipeline's output)."""
    import torch

    from promptpaint.config import TrainJobSpec, build_spec
    from promptpaint.models import load_model
    from promptpaint.training.loop import export_lora
    from promptpaint.training.model import LoraModel

    job = build_spec(
        TrainJobSpec, {"output": str(folder), "train": {"model": model, "instance_data": "x", "seed": seed}}
    )
    pipe = load_model(model, str(models), torch.device("cpu"), torch.float32).model
    lora = LoraModel(pipe, job.train, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_trainable():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return export_lora(lora, folder)


@pytest.fixture(scope="module")
def serve_url(ray_session, tiny_models, tmp_path_factory):
    """promptpaint's Serve app deployed from cluster/serve_config.yaml (the RayService's serveConfigV2 but for
    http_options.host: tests/test_cluster_manifests.py checks that) the way `serve run <config>` and KubeRay deploy
    a config: Serve's controller imports the application's import_path and calls it with its args. Only what this
    machine needs differs: a free port on 127.0.0.1; args.spec resolved from the repository root (the image's
    WORKDIR on a cluster); and `set` overrides appended to the config's own: the tiny models, an output folder, a
    token file, a LoRA store holding two SD 1.5 LoRAs (``dog-a``, ``dog-b``) and the small steps, batches, queues
    and limits the tests measure against. Shut down after the module (it holds CPUs)."""
    import time
    from types import SimpleNamespace

    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    from promptpaint.config import load_serve_spec

    tmp = tmp_path_factory.mktemp("serve")
    store = tmp / "loras"
    make_lora(store / "dog-a", tiny_models, seed=1)
    make_lora(store / "dog-b", tiny_models, seed=2)
    token = "test-token-123"
    (tmp / "token").write_text(token)
    port = free_port()
    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    args = app["args"]
    args["spec"] = str(ROOT / args["spec"])
    args["set"] = [*args.get("set", []),
        f"models_dir={tiny_models}", f"output={tmp / 'out'}", f"lora_store={store}", "lora_cache=1",
        "inpaint.steps=2", "generate.steps=2", "detect.queries=[dog]", "detect.threshold=0.0",
        f"http.port={port}", f"http.token_file={tmp / 'token'}", f"http.max_body_bytes={2 * 1024 * 1024}",
        "deployments.num_cpus=0.2", "deployments.max_batch_size=4", "deployments.batch_wait_timeout_s=0.02",
        "deployments.max_ongoing_requests=2", "deployments.max_queued_requests=4", "limits.max_pixels=4000000",
        "lineage.mode=offline", "lineage.metrics_every_s=1.0", "sample_every=5", "max_steps=200",
        f"max_generate_pixels={128 * 128}"]  # fmt: skip
    schema = ServeDeploySchema.model_validate(config)
    # What ray.serve.scripts.run does with a config file (and the dashboard's PUT /api/serve/applications/, which a
    # RayService calls, does with serveConfigV2): start Serve with the config's HTTP/gRPC options, apply the config.
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   controller_options=schema.controller_options)  # fmt: skip
    try:
        client.deploy_apps(schema)
        deadline = time.monotonic() + 600
        while True:
            status = serve.status().applications.get(app["name"])
            if status is not None and status.status == ApplicationStatus.RUNNING:
                break
            if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                pytest.fail(f"{app['name']} from cluster/serve_config.yaml: {status.status}: {status.message}")
            if time.monotonic() > deadline:
                pytest.fail(f"{app['name']} from cluster/serve_config.yaml is not running after 600 s: {status}")
            time.sleep(1)
        url = f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}"
        spec = load_serve_spec(args["spec"], args["set"])  # what build_app built
        yield SimpleNamespace(url=url, token=token, store=store, spec=spec, tmp=tmp, config=schema)
    finally:
        serve.shutdown()
    # the deployment's one Comet experiment, written as an offline archive when the ingress replica stopped
    archives = list((tmp / "out" / "comet").glob("*.zip"))
    assert len(archives) == 1, f"expected one offline Comet archive in {tmp / 'out' / 'comet'}, found {archives}"
