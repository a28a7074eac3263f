"""Request parameters of the HTTP API: pydantic models whose names and defaults are the spec's, and the one parser
that reads them from a multipart form or a JSON body (images as files or base64).

Every problem with a request is an :class:`ApiError` with a status (400-range) and the field it is about;
the ingress turns it into ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``: no bad input becomes a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from promptpaint.config import ServeSpec


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, msg: str, kind: str = "value_error"):
        super().__init__(msg)
        self.status, self.field, self.msg, self.kind = status, field, msg, kind

    def body(self) -> dict[str, Any]:
        loc = ["body", self.field] if self.field else ["body"]
        return {"detail": [{"loc": loc, "msg": self.msg, "type": self.kind}]}


def split_queries(v: Any) -> Any:
    """``"car, dog"`` (a form field) or ``["car", "dog"]`` -> stripped non-empty queries."""
    if isinstance(v, str):
        v = v.split(",")
    if isinstance(v, list) and all(isinstance(q, str) for q in v):
        return [q.strip() for q in v if q.strip()]
    return v


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "json"] = Field("png", description="png: the image (lineage in headers); json: base64")


class DetectParams(_Params):
    queries: list[str] = Field(..., min_length=1, max_length=64, description="what to find (comma-separated in a form)")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="None = detect.threshold")
    format: Literal["json"] = "json"

    @field_validator("queries", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return split_queries(v)


class PromptParams(_Params):
    """SAM prompts: points [[x, y, label]] (label 1 positive, 0 negative) and/or boxes [[x0, y0, x1, y1]], pixels."""

    points: list[tuple[float, float, int]] = Field(default_factory=list, max_length=256)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, max_length=256)

    @field_validator("points", "boxes", mode="before")
    @classmethod
    def _json_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return json.loads(v) if v.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from None
        return v

    @field_validator("points")
    @classmethod
    def _labels(cls, v: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        if any(p[2] not in (0, 1) for p in v):
            raise ValueError("a point's label is 1 (positive) or 0 (negative)")
        if not all(math.isfinite(p[0]) and math.isfinite(p[1]) for p in v):
            raise ValueError("point coordinates must be finite numbers (pixels)")
        return v

    @field_validator("boxes")
    @classmethod
    def _boxes(cls, v: list[tuple[float, float, float, float]]) -> list[tuple[float, float, float, float]]:
        if not all(all(math.isfinite(x) for x in b) for b in v):
            raise ValueError("box coordinates must be finite numbers (pixels)")
        if any(b[2] <= b[0] or b[3] <= b[1] for b in v):
            raise ValueError("a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return v

    def check_inside(self, width: int, height: int) -> None:
        """Every point and box inside a ``width`` x ``height`` image (ApiError 422 naming the field)."""
        if any(not (0 <= p[0] <= width and 0 <= p[1] <= height) for p in self.points):
            raise ApiError(422, "points", f"a point lies outside the {width}x{height} image")
        if any(b[0] < 0 or b[1] < 0 or b[2] > width or b[3] > height for b in self.boxes):
            raise ApiError(422, "boxes", f"a box lies outside the {width}x{height} image")


class SegmentParams(PromptParams):
    format: Literal["json"] = "json"


class _Diffusion(_Params):
    prompt: str | None = Field(None, max_length=2000, description="None = the spec's prompt")
    negative_prompt: str | None = Field(None, max_length=2000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    lora: str | None = Field(None, max_length=200, description="a LoRA id of the server's LoRA store")
    lora_scale: float = Field(1.0, ge=-8.0, le=8.0)

    @field_validator("lora")
    @classmethod
    def _lora_id(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if "/" in v or "\\" in v or v.startswith(".") or "\x00" in v:
            raise ValueError("a LoRA id is a folder name of the LoRA store, not a path")
        return v.strip()


class InpaintParams(_Diffusion):
    strength: float | None = Field(None, gt=0.0, le=1.0)


class EditParams(InpaintParams, PromptParams):
    queries: list[str] = Field(default_factory=list, max_length=64, description="None = detect.queries")
    threshold: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("queries", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return split_queries(v)


class GenerateParams(_Diffusion):
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8)


IMAGE_FIELDS = {"image", "mask"}


async def read_request(request: Any, model: type[_Params], images: tuple[str, ...]) -> tuple[Any, dict[str, bytes]]:
    """(validated params, {image field: bytes}) from a multipart/urlencoded form or a JSON body (``<field>`` or
    ``<field>_b64`` base64 strings for images)."""
    ctype = request.headers.get("content-type", "")
    raw: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    if ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(422, None, f"the body is not valid JSON: {e}", "json_invalid") from None
        if not isinstance(body, dict):
            raise ApiError(422, None, "the JSON body must be an object", "json_invalid")
        for key, value in body.items():
            name = key.removesuffix("_b64")
            if name in images:
                files[name] = _b64(name, value)
            else:
                raw[key] = value
    elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")) or not ctype:
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - a malformed body is the client's problem: 4xx
            raise ApiError(422, None, f"cannot parse the form: {e}", "form_invalid") from None
        for key, value in form.multi_items():
            name = key.removesuffix("_b64")
            if hasattr(value, "read"):
                if key not in images:
                    raise ApiError(422, key, f"unexpected file field {key!r}", "extra_forbidden")
                files[key] = await value.read()
            elif name in images:
                files[name] = _b64(name, value)
            else:
                raw[key] = value
    else:
        raise ApiError(415, None, f"content type {ctype!r}: send multipart/form-data or application/json")
    try:
        params = model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        raise ApiError(422, field, msg, err["type"]) from None
    return params, files


def _b64(field: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, field, "must be a base64 string", "type_error")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, field, "is not valid base64", "value_error") from None


def edit_defaults(spec: ServeSpec) -> dict[str, Any]:
    """The request defaults /v1/models shows (the spec's)."""
    return {
        "queries": spec.detect.texts,
        "threshold": spec.detect.threshold,
        "prompt": spec.inpaint.prompt,
        "negative_prompt": spec.inpaint.negative_prompt,
        "steps": spec.inpaint.steps,
        "guidance_scale": spec.inpaint.guidance_scale,
        "strength": spec.inpaint.strength,
        "seed": spec.inpaint.seed,
        "generate": {
            "prompt": spec.generate.prompt,
            "steps": spec.generate.steps,
            "guidance_scale": spec.generate.guidance_scale,
            "width": spec.generate.width,
            "height": spec.generate.height,
        },
    }
