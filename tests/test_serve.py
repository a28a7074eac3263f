"""The HTTP service on a real local Ray Serve (127.0.0.1, tiny models): endpoints, bit-exactness, determinism,
auth, limits, 4xx for bad input, per-request LoRAs, overload, cancellation, and the Serve config file.

One module-scoped server (``serve_url`` in conftest.py), deployed from cluster/serve_config.yaml as a RayService
deploys its serveConfigV2; every test is bounded in requests and time.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from promptpaint.io import read_image_text
from promptpaint.samples import make_photos

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url.url, timeout=120,
                      headers={"Authorization": f"Bearer {serve_url.token}"}) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def photo(serve_url) -> bytes:
    return Path(make_photos(serve_url.tmp / "photos", 1, (0.03, 0.05), seed=4)[0]).read_bytes()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="promptpaint")


def test_health_models_and_openapi(client, serve_url):
    assert httpx.get(f"{serve_url.url}/healthz").json() == {"status": "ok"}  # no token needed
    models = client.get("/v1/models").json()
    assert models["loras"] == ["dog-a", "dog-b"] and models["inpaint"]["name"] == "sd15-inpaint"
    spec = httpx.get(f"{serve_url.url}/openapi.json").json()
    for path in ("/v1/detect", "/v1/segment", "/v1/inpaint", "/v1/edit", "/v1/generate"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body)
    assert (
        "queries"
        in spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )


def test_the_running_app_is_cluster_serve_config(serve_url):
    """The module's server is cluster/serve_config.yaml deployed (conftest's serve_url): Serve's own account of it,
    the one KubeRay reads for a RayService's status (the dashboard's GET /api/serve/applications/), names the
    config's application, running, every deployment healthy."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    (want,) = serve_url.config.applications
    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    app = details.applications[want.name]
    assert app.status == "RUNNING" and app.route_prefix == want.route_prefix
    deployed = app.deployed_app_config
    assert (deployed.import_path, deployed.args) == (want.import_path, want.args)
    assert set(app.deployments) == {"ingress", "detect", "segment", "inpaint", "generate"}
    assert {d.status for d in app.deployments.values()} == {"HEALTHY"}


def test_detect_and_segment_round_trip(client, photo):
    r = client.post("/v1/detect", files={"image": photo}, data={"queries": "dog, car", "threshold": "0.0"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["boxes"] and {b["label"] for b in body["boxes"]} <= {"dog", "car"}
    assert body["lineage"]["models"]["detect"]["name"] == "owlv2"
    as_json = client.post("/v1/detect", json={"image": base64.b64encode(photo).decode(), "queries": ["dog", "car"],
                                               "threshold": 0.0})  # fmt: skip
    assert as_json.json()["boxes"] == body["boxes"]  # base64 JSON = multipart
    x0, y0, x1, y1 = body["boxes"][0]["box"]
    r = client.post("/v1/segment", files={"image": photo},
                    data={"points": json.dumps([[(x0 + x1) / 2, (y0 + y1) / 2, 1], [1, 1, 0]]),
                          "boxes": json.dumps([[x0, y0, x1, y1]])})  # fmt: skip
    assert r.status_code == 200, r.text
    masks = r.json()["masks"]
    assert masks and masks[0]["rle"]["size"] == [body["height"], body["width"]]
    assert (_png(base64.b64decode(masks[0]["png_b64"]))[..., 0] > 0).sum() == masks[0]["area"]


def test_edit_is_bit_exact_outside_the_mask_and_deterministic(client, photo):
    form = {"queries": "dog", "prompt": "a photo of a dog", "seed": "7", "format": "json"}
    a = client.post("/v1/edit", files={"image": photo}, data=form)
    assert a.status_code == 200, a.text
    b = client.post("/v1/edit", files={"image": photo}, data=form)
    assert a.json()["image_b64"] == b.json()["image_b64"]  # the same request twice: the same bytes
    out = _png(base64.b64decode(a.json()["image_b64"]))
    region = _png(base64.b64decode(a.json()["mask_b64"]))[..., 0] > 0
    src = _png(photo)
    assert region.any() and not region.all()
    assert np.array_equal(out[~region], src[~region])
    png = client.post("/v1/edit", files={"image": photo}, data={**form, "format": "png"})
    assert png.headers["content-type"] == "image/png"
    lineage = json.loads(png.headers["x-promptpaint-lineage"])
    assert lineage["seed"] == a.json()["lineage"]["seed"] and set(lineage["models"]) == {"detect", "segment", "inpaint"}
    assert json.loads(read_image_text(png.content)["promptpaint:lineage"])["request_id"] == lineage["request_id"]


def test_inpaint_and_generate_round_trip(client, photo):
    src = _png(photo)
    mask = np.zeros(src.shape[:2], np.uint8)
    mask[5:25, 10:40] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    r = client.post("/v1/inpaint", files={"image": photo, "mask": buf.getvalue()}, data={"prompt": "a hat"})
    assert r.status_code == 200, r.text
    out = _png(r.content)
    assert np.array_equal(out[mask == 0], src[mask == 0])
    g = client.post("/v1/generate", data={"prompt": "a photo of a dog", "width": "64", "height": "48"})
    assert g.status_code == 200 and _png(g.content).shape == (48, 64, 3)


def test_auth_limits_and_bad_input_are_4xx(client, serve_url, photo):
    anon = httpx.post(f"{serve_url.url}/v1/detect", files={"image": photo}, data={"queries": "dog"})
    wrong = httpx.post(f"{serve_url.url}/v1/detect", files={"image": photo}, data={"queries": "dog"},
                       headers={"Authorization": "Bearer nope"})  # fmt: skip
    assert anon.status_code == wrong.status_code == 401
    pre = httpx.options(f"{serve_url.url}/v1/detect", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert "access-control-allow-origin" not in pre.headers  # CORS off by default
    big = client.post("/v1/detect", files={"image": b"\0" * (3 * 1024 * 1024)}, data={"queries": "dog"})
    assert big.status_code == 413
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # 25 MP, a few KB: over limits.max_pixels
    r = client.post("/v1/detect", files={"image": bomb.getvalue()}, data={"queries": "dog"})
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "image"]
    cases = [
        ({"files": {"image": b"just some text"}, "data": {"queries": "dog"}}, "image"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, None),
        ({"files": {"image": photo}, "data": {"queries": "dog", "threshold": "7"}}, "threshold"),
        ({"files": {"image": photo}, "data": {"queries": "dog", "colour": "red"}}, "colour"),
        ({"files": {"image": photo}, "data": {}}, "queries"),
    ]
    for kwargs, field in cases:
        r = client.post("/v1/detect", **kwargs)
        assert r.status_code == 422, (field, r.status_code, r.text)
        if field:
            assert r.json()["detail"][0]["loc"][-1] == field, r.text
    for data, field in (({"points": "[[1e999, 1, 1]]"}, "points"), ({"points": "[[99999, 1, 1]]"}, "points"),
                        ({"boxes": "[[10, 10, 5, 20]]"}, "boxes"), ({"boxes": "[[0, 0, 99999, 5]]"}, "boxes")):  # fmt: skip
        r = client.post("/v1/segment", files={"image": photo}, data=data)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, (data, r.status_code, r.text)
    r = client.post("/v1/generate", data={"prompt": "x", "steps": "0"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "steps"
    r = client.post("/v1/generate", data={"prompt": "x", "lora": "no-such-lora"})
    assert r.status_code == 404 and r.json()["detail"][0]["loc"][-1] == "lora"
    r = client.post("/v1/generate", data={"prompt": "x", "lora": "../etc"})
    assert r.status_code == 422


def test_per_request_loras(client, serve_url):
    gen = _handle("generate")
    form = {"prompt": "a photo of sks dog", "seed": "3", "steps": "1"}
    plain = client.post("/v1/generate", data=form).content
    a = client.post("/v1/generate", data={**form, "lora": "dog-a"})
    b = client.post("/v1/generate", data={**form, "lora": "dog-b"})
    assert a.status_code == b.status_code == 200
    imgs = [_png(x) for x in (plain, a.content, b.content)]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])
    lineage = json.loads(b.headers["x-promptpaint-lineage"])["lora"]
    assert lineage["id"] == "dog-b" and len(lineage["sha256"]) == 64
    loads = gen.stats.remote().result()["lora_loads"]
    again = client.post("/v1/generate", data={**form, "lora": "dog-b"})
    assert np.array_equal(_png(again.content), imgs[2])
    assert gen.stats.remote().result()["lora_loads"] == loads  # cached: no reload
    assert np.array_equal(_png(client.post("/v1/generate", data=form).content), imgs[0])  # LoRA off again


def test_fifty_lora_swaps_do_not_grow_memory(client):
    """lora_cache is 1: alternating two LoRAs loads one and evicts (unloads) the other every request."""
    gen = _handle("generate")
    form = {"prompt": "a dog", "steps": "1", "width": "32", "height": "32"}
    for k in range(10):  # warm-up: allocator pools, both LoRAs seen
        client.post("/v1/generate", data={**form, "lora": "dog-a" if k % 2 else "dog-b"})
    before = gen.stats.remote().result()
    for k in range(50):
        r = client.post("/v1/generate", data={**form, "lora": "dog-a" if k % 2 else "dog-b"})
        assert r.status_code == 200
    after = gen.stats.remote().result()
    assert after["lora_loads"] - before["lora_loads"] == 50 and after["lora_unloads"] - before["lora_unloads"] == 50
    assert after["rss_mb"] - before["rss_mb"] < 64, (before["rss_mb"], after["rss_mb"])


def test_a_burst_gets_429_with_retry_after_and_nothing_else(serve_url, client):
    """60 concurrent generate requests against max_ongoing_requests=2 and max_queued_requests=4."""

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{serve_url.url}/v1/generate", data={"prompt": "a dog", "steps": "4"}, timeout=120,
                          headers={"Authorization": f"Bearer {serve_url.token}"})  # fmt: skip

    t0 = time.monotonic()
    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(one, range(60)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(429) + codes.count(503) > 0 and codes.count(200) > 0
    assert all(r.headers.get("retry-after") for r in results if r.status_code in (429, 503))
    assert time.monotonic() - t0 < 120
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/generate", data={"prompt": "a dog", "steps": "1"}).status_code == 200


def test_a_disconnected_client_stops_its_diffusion_loop(serve_url, client):
    gen = _handle("generate")
    before = gen.stats.remote().result()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{serve_url.url}/v1/generate", data={"prompt": "a dog", "steps": "200", "width": "64"},
                   headers={"Authorization": f"Bearer {serve_url.token}"}, timeout=1.5)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = gen.stats.remote().result()
        if now.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.2)
    assert now.get("cancelled", 0) > before.get("cancelled", 0), now
    time.sleep(1.0)  # the loop raises at its next step (the stage's row-by-row retry stops after one more)
    settled = gen.stats.remote().result()["steps"]
    time.sleep(1.0)
    assert gen.stats.remote().result()["steps"] == settled  # stopped, and stays stopped
    assert settled - before.get("steps", 0) < 200  # long before the 200 steps asked for


def test_the_serve_config_file_matches_the_code(tiny_models, monkeypatch):
    """cluster/serve_config.yaml is what `serve run` / RayService deploy: it must validate against Ray's schema
    and build this code's application."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from promptpaint.serve import models
    from promptpaint.serve.app import Ingress, build_app

    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    (app_cfg,) = ServeDeploySchema.model_validate(config).applications
    assert app_cfg.import_path == "promptpaint.serve.app:build_app" and app_cfg.route_prefix == "/"
    monkeypatch.chdir(ROOT)  # serve run resolves the spec path from where it runs: the repository root
    args = {**app_cfg.args, "set": [*app_cfg.args.get("set", []), f"models_dir={tiny_models}"]}
    assert isinstance(build_app({**args, "insecure": True}), Application)
    known = {d.name for d in (Ingress, models.DetectModel, models.SegmentModel, models.InpaintModel,
                              models.GenerateModel)}  # fmt: skip
    assert known == {"ingress", "detect", "segment", "inpaint", "generate"}
    assert {d.name for d in app_cfg.deployments or []} <= known  # per-deployment overrides name real ones


def test_no_token_needs_insecure(tiny_models, monkeypatch):
    from promptpaint.config import ServeSpec, build_spec
    from promptpaint.serve.app import read_token

    monkeypatch.delenv("PROMPTPAINT_API_TOKEN", raising=False)
    spec = build_spec(ServeSpec, {"models_dir": str(tiny_models)})
    with pytest.raises(PermissionError, match="--insecure"):
        read_token(spec, insecure=False)
    assert read_token(spec, insecure=True) is None
    monkeypatch.setenv("PROMPTPAINT_API_TOKEN", "abc")
    assert read_token(spec, insecure=False) == b"abc"


def test_no_server_errors_for_generated_requests(serve_url):
    """schemathesis over /openapi.json (bounded examples per operation): no 5xx for anything it sends."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{serve_url.url}/openapi.json")
    failures: list[str] = []
    count = 0
    for op in schema.get_all_operations():
        operation = op.ok()

        name = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def run(case: object) -> None:
            nonlocal count
            count += 1
            r = case.call(base_url=serve_url.url, headers={"Authorization": f"Bearer {serve_url.token}"},
                          timeout=60)  # fmt: skip
            if r.status_code >= 500:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")  # noqa: B023 - run() is called right away

        run()
    assert count >= 20
    assert not failures, failures
