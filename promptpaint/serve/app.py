"""The HTTP service: a FastAPI ingress deployment composed with the model deployments (``models.py``).

Serve pickles the FastAPI app *when the ingress class is decorated*: everything its routes use must be defined
above the class, process state the middleware reads lives in ``SECURITY`` (imported by reference), and the
module has no ``from __future__ import annotations`` (the replica re-reads route signatures, and string annotations
would not resolve there).

``build_app(args)`` is the Serve application builder ``serve run`` / ``serve deploy`` / a RayService import
(``promptpaint.serve.app:build_app``, args ``{spec: path, insecure: bool}`` or an inline ``spec_data``), and what
``promptpaint serve`` runs. Security lives here, because Serve's proxy has none: bearer-token auth (constant-time
compare), a body-size limit before anything is parsed, a pixel limit before anything is decoded, 4xx JSON naming
the field for every bad input, CORS off unless origins are listed. Overload: each model deployment queues at
most ``deployments.max_queued_requests``; past that the ingress answers 429 with Retry-After.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from promptpaint.config import ServeSpec, load_serve_spec
from promptpaint.io import DecodeError, decode_image, encode_png
from promptpaint.serve.lineage import METRICS
from promptpaint.serve.params import (
    ApiError,
    DetectParams,
    EditParams,
    GenerateParams,
    InpaintParams,
    SegmentParams,
    edit_defaults,
    read_request,
)

log = logging.getLogger("promptpaint.serve")
STATIC = Path(__file__).with_name("static")
TOKEN_ENV = "PROMPTPAINT_API_TOKEN"
OPEN_PATHS = ("/", "/healthz", "/openapi.json", "/docs", "/favicon.ico")
LINEAGE_HEADER = "X-Promptpaint-Lineage"
_UNSET = object()
# What the middleware enforces in this process, set by the Ingress replica at start (token None = --insecure).
SECURITY: dict[str, Any] = {}

app = FastAPI(
    title="promptpaint",
    version="0.1.0",
    description="Detect, segment, inpaint, edit and generate images with prompts. Bearer-token auth on /v1/*.",
)


# ------------------------------------------------------------------------------------------------ security


class _Guard:
    """Pure ASGI middleware: body-size limit (413 before the body is read) and bearer-token auth (401)."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit: int = SECURITY.get("max_body_bytes", 25 * 2**20)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if not (path in OPEN_PATHS or path.startswith("/static/")):
            token = SECURITY.get("token", _UNSET)
            if token is _UNSET:  # the replica has not read its token yet: refuse, never serve open
                return await _send_json(send, 503, {"detail": "starting"}, {"retry-after": "1"})
            if token is not None:
                given = headers.get("authorization", "")
                ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token)
                if not ok:
                    return await _send_json(send, 401, {"detail": "missing or wrong bearer token"},
                                            {"www-authenticate": "Bearer"})  # fmt: skip
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_json(send, 413, {"detail": f"request body over the limit of {limit} bytes"})
        seen = 0
        t0 = time.perf_counter()
        status = 500

        async def recorded(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        try:
            await self.inner(scope, limited, recorded)
        except _TooLarge as e:
            status = 413
            await _send_json(send, 413, {"detail": f"request body over the limit of {e.limit} bytes"})
        finally:
            METRICS.record(path, status, (time.perf_counter() - t0) * 1000)


class _TooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit


async def _send_json(send: Any, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


app.add_middleware(_Guard)


class _Cors:
    """CORS only for ``http.cors_origins`` (set by the ingress replica in SECURITY); off by default."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        origins = SECURITY.get("cors_origins") or []
        if scope["type"] != "http" or not origins:
            return await self.inner(scope, receive, send)
        from starlette.middleware.cors import CORSMiddleware

        cors = CORSMiddleware(self.inner, allow_origins=origins, allow_methods=["GET", "POST"],
                              allow_headers=["Authorization", "Content-Type"],
                              expose_headers=[LINEAGE_HEADER, "Retry-After"])  # fmt: skip
        return await cors(scope, receive, send)


app.add_middleware(_Cors)  # outermost: preflight requests carry no token


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def read_token(spec: ServeSpec, insecure: bool) -> bytes | None:
    """The bearer token from ``http.token_file`` or PROMPTPAINT_API_TOKEN; None only with ``insecure``."""
    token = ""
    if spec.http.token_file:
        token = Path(spec.http.token_file).read_text(encoding="utf-8").strip()
    token = token or os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token.encode()
    if not insecure:
        raise PermissionError(
            f"no API token: set {TOKEN_ENV} or http.token_file, or pass --insecure to serve without authentication"
        )
    log.warning("serving WITHOUT authentication (--insecure): anyone who can reach the port can use the models")
    return None


# ------------------------------------------------------------------------------------------------- helpers


def _image(spec: ServeSpec, data: bytes | None, field: str = "image") -> np.ndarray:
    if not data:
        raise ApiError(422, field, "an image is required (multipart file or base64)", "missing")
    try:
        return decode_image(data, max_pixels=spec.limits.max_pixels, formats=spec.limits.formats).rgb
    except DecodeError as e:
        status = 413 if e.kind == "too_large" else 422
        raise ApiError(status, field, e.message, e.kind) from None


def _check_cost(spec: ServeSpec, p: Any) -> None:
    """Operator limits on what one request may cost: steps, generated pixels."""
    if getattr(p, "steps", None) is not None and p.steps > spec.max_steps:
        raise ApiError(422, "steps", f"at most {spec.max_steps} steps on this server (max_steps)", "less_than_equal")
    w = getattr(p, "width", None) or spec.generate.width
    h = getattr(p, "height", None) or spec.generate.height
    w, h = w or h or 0, h or w or 0  # a side left to the model's default counts as the given one (square)
    if w * h > spec.max_generate_pixels:
        raise ApiError(422, "width", f"width x height over {spec.max_generate_pixels} pixels (max_generate_pixels)",
                       "less_than_equal")  # fmt: skip


def _request_id(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _png_b64(rgb: np.ndarray, text: dict[str, str] | None = None) -> str:
    return base64.b64encode(encode_png(rgb, text=text)).decode()


def _mask_png(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


async def _call(handle: Any, req: dict[str, Any], retry_after: int, lora: str | None = None) -> dict[str, Any]:
    """One model-deployment call; a full queue is 429 + Retry-After, a stage error on the row is 500 only when
    it is promptpaint's or the model's (never for bad input, which never gets this far)."""
    from ray.serve.exceptions import BackPressureError

    h = handle.options(multiplexed_model_id=lora) if lora else handle
    try:
        res = await h.remote(req)
    except BackPressureError:
        raise _Overloaded(retry_after) from None
    err = res.get("error")
    if err and err["status"] == "error" and err["kind"] in ("model_error", "internal_error"):
        raise RuntimeError(f"{err['kind']}: {err['message'].splitlines()[0][:300]}")
    return res


class _Overloaded(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


@app.exception_handler(_Overloaded)
async def _overloaded(request: Request, exc: _Overloaded) -> JSONResponse:
    return JSONResponse({"detail": "the server is busy; retry later"}, status_code=429,
                        headers={"Retry-After": str(exc.retry_after)})  # fmt: skip


def _respond(fmt: str, image: np.ndarray | None, body: dict[str, Any], text: dict[str, str]) -> Response:
    lineage = body.get("lineage", {})
    header = {LINEAGE_HEADER: json.dumps(lineage, separators=(",", ":"), default=str, ensure_ascii=True)}
    if fmt == "png" and image is not None:
        return Response(encode_png(image, text=text), media_type="image/png", headers=header)
    if image is not None:
        body["image_b64"] = _png_b64(image, text)
    return JSONResponse(json.loads(json.dumps(body, default=_jsonable)), headers=header)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def _body_schema(model: Any, images: tuple[str, ...]) -> dict[str, Any]:
    """OpenAPI request bodies (multipart with image files, JSON with base64 images) from the params model."""
    schema = model.model_json_schema()
    props = dict(schema.get("properties", {}))
    multipart = {**schema, "properties": {**props, **{f: {"type": "string", "format": "binary"} for f in images}},
                 "required": [*schema.get("required", []), *images]}  # fmt: skip
    as_json = {**schema, "properties": {**props, **{f: {"type": "string", "format": "byte"} for f in images}},
               "required": [*schema.get("required", []), *images]}  # fmt: skip
    multipart.pop("$defs", None)
    as_json.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                                          "application/json": {"schema": as_json}}}}  # fmt: skip


def _lora_ids(spec: ServeSpec) -> list[str]:
    """LoRA ids = folders of the LoRA store holding a LoRA file."""
    if not spec.lora_store:
        return []
    import fsspec

    from promptpaint.lora import LORA_FILE

    fs, root = fsspec.core.url_to_fs(spec.lora_store)
    if not fs.exists(root):
        return []
    return sorted(p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root.rstrip('/')}/*/{LORA_FILE}"))


# ------------------------------------------------------------------------------------------------- ingress


@serve.deployment(name="ingress", max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, spec_json: dict[str, Any], detect: Any, segment: Any, inpaint: Any, generate: Any,
                 insecure: bool = False):  # fmt: skip
        self.spec = ServeSpec.model_validate(spec_json)
        self.detect, self.segment, self.inpaint, self.generate = detect, segment, inpaint, generate
        # Serve runs a pickled copy of ``app``; the middleware (imported by reference) reads this module's SECURITY.
        from promptpaint.serve import app as this_module

        this_module.SECURITY.update(token=read_token(self.spec, insecure), max_body_bytes=self.spec.http.max_body_bytes,
                                    cors_origins=list(self.spec.http.cors_origins))  # fmt: skip
        self.retry = self.spec.http.retry_after_s
        self.spec_hash = self.spec.spec_hash()
        from promptpaint.serve.lineage import ServeLineage

        self.lineage = ServeLineage(self.spec, f"serve-{self.spec_hash}")

    def __del__(self) -> None:  # Serve calls this when the replica shuts down: write the Comet archive
        lineage = self.__dict__.get("lineage")
        if lineage is not None:
            lineage.close()

    # -- pages ---------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self) -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return JSONResponse({"detail": "the playground is not installed"}, status_code=404)
        return FileResponse(page)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "detect": {"name": self.spec.detect.model},
            "segment": {"name": self.spec.segment.model},
            "inpaint": {"name": self.spec.inpaint.model},
            "generate": {"name": self.spec.generate.model},
            "loras": _lora_ids(self.spec),
            "lora_store": self.spec.lora_store,
            "defaults": edit_defaults(self.spec),
            "spec_hash": self.spec_hash,
        }

    # -- endpoints -----------------------------------------------------------------------------------------
    @app.post("/v1/detect", openapi_extra=_body_schema(DetectParams, ("image",)))
    async def v1_detect(self, request: Request) -> Response:
        t0 = time.perf_counter()
        p, files = await read_request(request, DetectParams, ("image",))
        image = await asyncio.to_thread(_image, self.spec, files.get("image"))  # decoding off the event loop
        rid = _request_id(files["image"], p.model_dump(exclude={"format"}))
        res = await _call(self.detect, {"id": rid, "image": image, "queries": p.queries,
                                        "threshold": self.spec.detect.threshold if p.threshold is None else p.threshold},
                          self.retry)  # fmt: skip
        boxes = [{"box": [round(float(x), 2) for x in b], "score": float(s), "label": lab}
                 for b, s, lab in zip(res["boxes"], res["scores"], res["labels"], strict=True)]  # fmt: skip
        lineage = self._lineage(rid, t0, {"detect": res["model"]})
        return _respond("json", None, {"boxes": boxes, "width": image.shape[1], "height": image.shape[0],
                                        "lineage": lineage}, {})  # fmt: skip

    @app.post("/v1/segment", openapi_extra=_body_schema(SegmentParams, ("image",)))
    async def v1_segment(self, request: Request) -> Response:
        from promptpaint.coco import encode_rle

        t0 = time.perf_counter()
        p, files = await read_request(request, SegmentParams, ("image",))
        image = await asyncio.to_thread(_image, self.spec, files.get("image"))  # decoding off the event loop
        if not p.points and not p.boxes:
            raise ApiError(422, "points", "give points and/or boxes to segment", "missing")
        rid = _request_id(files["image"], p.model_dump(exclude={"format"}))
        res = await self._segment(rid, image, p)
        masks = [{"rle": encode_rle(m), "score": float(s), "area": int(m.sum()),
                  "png_b64": base64.b64encode(_mask_png(m)).decode()}
                 for m, s in zip(res["masks"], res["scores"], strict=True)]  # fmt: skip
        lineage = self._lineage(rid, t0, {"segment": res["model"]})
        return _respond("json", None, {"masks": masks, "lineage": lineage}, {})

    @app.post("/v1/inpaint", openapi_extra=_body_schema(InpaintParams, ("image", "mask")))
    async def v1_inpaint(self, request: Request) -> Response:
        t0 = time.perf_counter()
        p, files = await read_request(request, InpaintParams, ("image", "mask"))
        _check_cost(self.spec, p)
        image = await asyncio.to_thread(_image, self.spec, files.get("image"))  # decoding off the event loop
        mask_rgb = await asyncio.to_thread(_image, self.spec, files.get("mask"), "mask")
        if mask_rgb.shape[:2] != image.shape[:2]:
            raise ApiError(422, "mask", f"mask is {mask_rgb.shape[1]}x{mask_rgb.shape[0]}, image "
                                        f"{image.shape[1]}x{image.shape[0]}: they must match")  # fmt: skip
        mask = mask_rgb.max(axis=2) > 127
        if not mask.any():
            raise ApiError(422, "mask", "the mask is empty (no pixel > 127)")
        lora = self._check_lora(p.lora)
        rid = _request_id(files["image"], files["mask"], p.model_dump(exclude={"format"}))
        res = await self._inpaint(rid, image, mask.astype(np.float32), p, lora)
        return self._edited(rid, t0, p, res, {"inpaint": res["model"]}, mask, "inpaint", image)

    @app.post("/v1/edit", openapi_extra=_body_schema(EditParams, ("image",)))
    async def v1_edit(self, request: Request) -> Response:
        from promptpaint.actors.maskops import MaskOps

        t0 = time.perf_counter()
        p, files = await read_request(request, EditParams, ("image",))
        _check_cost(self.spec, p)
        image = await asyncio.to_thread(_image, self.spec, files.get("image"))  # decoding off the event loop
        lora = self._check_lora(p.lora)
        rid = _request_id(files["image"], p.model_dump(exclude={"format"}))
        models: dict[str, Any] = {}
        if p.points or p.boxes:
            seg = await self._segment(rid, image, p)
            labels, scores = ["prompt"] * len(seg["masks"]), np.ones(len(seg["masks"]), np.float32)
        else:
            queries = p.queries or self.spec.detect.texts
            threshold = self.spec.detect.threshold if p.threshold is None else p.threshold
            det = await _call(self.detect, {"id": rid, "image": image, "queries": queries, "threshold": threshold},
                              self.retry)  # fmt: skip
            models["detect"] = det["model"]
            if not len(det["labels"]):
                lineage = self._lineage(rid, t0, models)
                body = {"status": "no_detection", "boxes": [], "lineage": lineage}
                return _respond(p.format, image, body, self._text(rid, lineage))
            seg = await _call(self.segment, {"id": rid, "image": image, "boxes": det["boxes"], "points": [],
                                             "point_labels": []}, self.retry)  # fmt: skip
            labels, scores = det["labels"], det["scores"]
        models["segment"] = seg["model"]
        batch = {"id": [rid], "status": [""], "error_stage": [""], "error_kind": [""], "error_message": [""],
                 "masks": [seg["masks"]], "det_scores": [scores], "labels": [labels]}  # fmt: skip
        MaskOps(self.spec.mask)(batch)
        if batch["status"][0]:
            raise ApiError(422, "image", batch["error_message"][0] or batch["status"][0], batch["status"][0])
        res = await self._inpaint(rid, image, batch["blend"][0], p, lora)
        models["inpaint"] = res["model"]
        # the region that may change: the feathered blend's support (outside it the output is the input, bit for bit)
        return self._edited(rid, t0, p, res, models, batch["blend"][0] > 0, "edit", image)

    @app.post("/v1/generate", openapi_extra=_body_schema(GenerateParams, ()))
    async def v1_generate(self, request: Request) -> Response:
        t0 = time.perf_counter()
        p, _ = await read_request(request, GenerateParams, ())
        _check_cost(self.spec, p)
        lora = self._check_lora(p.lora, "generate")
        g = self.spec.generate
        settings = {k: v for k, v in {"steps": p.steps, "guidance_scale": p.guidance_scale, "seed": p.seed,
                                      "width": p.width, "height": p.height}.items() if v is not None}  # fmt: skip
        prompt = p.prompt if p.prompt is not None else g.prompt
        negative = p.negative_prompt if p.negative_prompt is not None else g.negative_prompt
        rid = _request_id(prompt, negative, settings, p.lora, p.lora_scale)
        req = {"id": rid, "prompt": prompt, "negative_prompt": negative, "settings": settings,
               "lora_scale": p.lora_scale}  # fmt: skip
        res = await _call(self.generate, req, self.retry, lora)
        lineage = self._lineage(rid, t0, {"generate": res["model"]}, res["seed"], res.get("lora"))
        lineage.update(prompt=prompt, negative_prompt=negative, settings=settings)
        self.lineage.sample("generate", {"output": res["image"]}, lineage)
        return _respond(p.format, res["image"], {"lineage": lineage}, self._text(rid, lineage))

    # -- pieces --------------------------------------------------------------------------------------------
    async def _segment(self, rid: str, image: np.ndarray, p: Any) -> dict[str, Any]:
        p.check_inside(image.shape[1], image.shape[0])
        pts = np.asarray([q[:2] for q in p.points], np.float32).reshape(-1, 2)
        labels = np.asarray([q[2] for q in p.points], np.int64)
        boxes = np.asarray(p.boxes, np.float32).reshape(-1, 4)
        return await _call(self.segment, {"id": rid, "image": image, "boxes": boxes, "points": pts,
                                          "point_labels": labels}, self.retry)  # fmt: skip

    async def _inpaint(self, rid: str, image: np.ndarray, blend: np.ndarray, p: Any, lora: str | None) -> dict:
        settings = {k: v for k, v in {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed,
                                      "steps": p.steps, "guidance_scale": p.guidance_scale,
                                      "strength": p.strength}.items() if v is not None}  # fmt: skip
        req = {"id": rid, "image": image, "blend": blend, "settings": settings, "lora_scale": p.lora_scale}
        return await _call(self.inpaint, req, self.retry, lora)

    def _edited(self, rid: str, t0: float, p: Any, res: dict[str, Any], models: dict[str, Any], mask: np.ndarray,
                kind: str, image: np.ndarray) -> Response:  # fmt: skip
        lineage = self._lineage(rid, t0, models, res["seed"], res.get("lora"))
        lineage.update(prompts=res["prompts"], crops=res["crops"])
        body = {"status": "edited", "lineage": lineage, "mask_b64": base64.b64encode(_mask_png(mask)).decode()}
        self.lineage.sample(kind, {"input": image, "mask": mask, "output": res["edited"]}, lineage)
        return _respond(p.format, res["edited"], body, self._text(rid, lineage))

    def _check_lora(self, lora: str | None, stage: str = "inpaint") -> str | None:
        if lora is None:
            return None
        from promptpaint.io import join
        from promptpaint.lora import LoraError, LoraNotFound, check_lora

        unknown = ApiError(404, "lora", f"unknown LoRA {lora!r}; GET /v1/models lists the LoRA store", "not_found")
        if not self.spec.lora_store:
            raise unknown
        model = self.spec.inpaint.model if stage == "inpaint" else self.spec.generate.model
        try:  # one file lookup (its header cached per file version), not a listing of the store per request
            check_lora(join(self.spec.lora_store, lora), model, "lora")
        except LoraNotFound:
            raise unknown from None
        except LoraError as e:
            raise ApiError(422, "lora", str(e), "lora_mismatch") from None
        return lora

    def _lineage(self, rid: str, t0: float, models: dict[str, Any], seed: int | None = None,
                 lora: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        out: dict[str, Any] = {"request_id": rid, "spec_hash": self.spec_hash, "models": models,
                               "experiment_key": self.lineage.key,
                               "ms": round((time.perf_counter() - t0) * 1000, 2)}  # fmt: skip
        if seed is not None:
            out["seed"] = seed
        if lora:
            out["lora"] = lora
        return out

    def _text(self, rid: str, lineage: dict[str, Any]) -> dict[str, str]:
        return {
            "promptpaint:id": rid,
            "promptpaint:spec_hash": self.spec_hash,
            "promptpaint:lineage": json.dumps(
                {k: v for k, v in lineage.items() if k != "ms"}, sort_keys=True, default=str
            ),
        }  # fmt: skip  (timings vary: not in the bytes)


# ------------------------------------------------------------------------------------------------- the app


def deployment_options(spec: ServeSpec) -> dict[str, Any]:
    d = spec.deployments
    autoscaling = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                   "target_ongoing_requests": d.target_ongoing_requests}  # fmt: skip
    return {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
    }


def diffusion_options(spec: ServeSpec) -> dict[str, Any]:
    """Inpaint / generate: also their LoRA LRU size (read by @serve.multiplexed when the module is imported)."""
    opts = deployment_options(spec)
    env = {"PROMPTPAINT_LORA_CACHE": str(spec.lora_cache)}
    opts["ray_actor_options"] = {**opts["ray_actor_options"], "runtime_env": {"env_vars": env}}
    return opts


def build(spec: ServeSpec, insecure: bool = False) -> Any:
    """The Serve application: ingress + detect, segment, inpaint, generate deployments."""
    from promptpaint.serve.models import DetectModel, GenerateModel, InpaintModel, SegmentModel

    read_token(spec, insecure)  # fail here, not in a replica, when there is no token
    data = spec.model_dump(mode="json")
    opts, dopts = deployment_options(spec), diffusion_options(spec)
    models = [m.options(**opts).bind(data) for m in (DetectModel, SegmentModel)]
    models += [m.options(**dopts).bind(data) for m in (InpaintModel, GenerateModel)]
    d = spec.deployments
    ingress = {"min_replicas": max(1, d.min_replicas), "max_replicas": d.max_replicas, "target_ongoing_requests": 32}
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}, autoscaling_config=ingress).bind(
        data, *models, insecure=insecure
    )


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: promptpaint.serve.app:build_app``).

    args: ``spec`` (a serve spec YAML path) and/or ``spec_data`` (the spec inline), ``set`` (list of overrides),
    ``insecure`` (bool; default false: a token is required).
    """
    from promptpaint.config import build_spec

    overrides = list(args.get("set") or [])
    if args.get("spec_data") is not None:
        spec = build_spec(ServeSpec, dict(args["spec_data"]), source="serve config")
        if overrides:
            from promptpaint.config import apply_overrides

            spec = build_spec(ServeSpec, apply_overrides(spec.model_dump(mode="json"), overrides))
    else:
        spec = load_serve_spec(args.get("spec"), overrides)
    return build(spec, insecure=bool(args.get("insecure", False)))
