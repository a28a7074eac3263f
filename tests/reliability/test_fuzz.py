"""Fuzzing with hypothesis: the decoder and spec parsing raise nothing but their typed errors.

Contracts:
  * ``decode_image`` returns a well-formed :class:`Decoded` or raises :class:`DecodeError` with a known
    kind -- for arbitrary bytes and for valid images with bytes flipped, cut, inserted or header
    integers overwritten.
  * spec parsing (``build_spec``, ``parse_override``/``apply_overrides``, ``load_edit_spec``) returns an
    ``EditSpec`` or raises :class:`SpecError` (the CLI's exit 2); a spec it accepts hashes, flattens and
    survives a YAML round trip unchanged.

Bounded for CI: ``PROMPTPAINT_FUZZ_EXAMPLES`` examples per test (default 500, ~15 s in all) with a fixed derandomized
seed, so CI is reproducible; set ``PROMPTPAINT_FUZZ_RANDOM=1`` (and more examples) to explore.
Parse bugs found by fuzzing are pinned as regression tests below.
"""

from __future__ import annotations

import io
import math
import os
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_kit import record

from promptpaint.config import STAGES, EditSpec, SpecError, apply_overrides, build_spec, load_edit_spec
from promptpaint.io import ERROR_KINDS, DecodeError, decode_image

EXAMPLES = int(os.environ.get("PROMPTPAINT_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("PROMPTPAINT_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)
FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"]
MAX_PIXELS = 1_000_000
TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    if TALLY["decode"]:
        record(
            "Fuzzing decode_image (hypothesis)",
            injected="arbitrary bytes; valid images with bytes set/cut/inserted/deleted and header ints overwritten",
            tried=TALLY["decode"],
            crashes=TALLY["decode_crash"],
            lost=0,
            duplicated=0,
            decoded=TALLY["decode_ok"],
            typed_errors=TALLY["decode_error"],
        )
    if TALLY["spec"]:
        record(
            "Fuzzing spec parsing (hypothesis)",
            injected="random and mostly-valid spec trees, --set overrides, spec files",
            tried=TALLY["spec"],
            crashes=TALLY["spec_crash"],
            lost=0,
            duplicated=0,
            accepted_and_round_tripped=TALLY["spec_ok"],
            spec_errors=TALLY["spec_error"],
        )


# ------------------------------------------------------------------------------------------- decoding


def _encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return {
        "png": _encode(rgb, "PNG"),
        "png_palette_trns": _encode(pal, "PNG", transparency=0),
        "png_16bit": _encode(Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)), "PNG"),
        "png_la": _encode(rgb.convert("LA"), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg_progressive_cmyk": _encode(rgb.convert("CMYK"), "JPEG", progressive=True),
        "gif_animated": _encode(pal, "GIF", save_all=True, append_images=[pal.rotate(90)], duration=20),
        "webp": _encode(rgb, "WEBP"),
        "webp_lossless": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "bmp": _encode(rgb, "BMP"),
        "tiff_lzw_pages": _encode(rgb, "TIFF", compression="tiff_lzw", save_all=True, append_images=[rgb]),
        "tiff_float": _encode(Image.fromarray(rng.normal(0, 300, (12, 12)).astype(np.float32)), "TIFF"),
    }


SEEDS = _seeds()


def check_decode(data: bytes) -> None:
    """The decode contract; counts outcomes for the report."""
    TALLY["decode"] += 1
    try:
        d = decode_image(data, max_pixels=MAX_PIXELS, formats=FORMATS)
    except DecodeError as e:
        TALLY["decode_error"] += 1
        assert e.kind in ERROR_KINDS and e.message
        return
    except BaseException:
        TALLY["decode_crash"] += 1
        raise
    TALLY["decode_ok"] += 1
    h, w = d.rgb.shape[:2]
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (h, w, 3)
    assert 0 < h * w <= MAX_PIXELS
    assert d.rgb.flags.c_contiguous and d.rgb.flags.writeable
    assert d.alpha is None or (d.alpha.shape == (h, w) and d.alpha.dtype == np.uint8)
    assert d.format in FORMATS


MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**20)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 64)),
    st.tuples(
        st.just("int"),
        st.integers(0, 2**20),
        st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 65_500]),
        st.sampled_from(["<H", ">H", "<I", ">I"]),
    ),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        at = op[1] % len(buf)
        if op[0] == "set":
            buf[at] = op[2]
        elif op[0] == "cut":
            del buf[at:]
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "delete":
            del buf[at : at + op[2]]
        else:
            fmt = op[3]
            size = 2 if fmt[1] == "H" else 4
            value = op[2] & (0xFFFF if size == 2 else 0xFFFF_FFFF)
            buf[at : at + size] = value.to_bytes(size, "little" if fmt[0] == "<" else "big")
    return bytes(buf)


@pytest.mark.reliability
@FUZZ
@given(st.binary(max_size=4096))
def test_decode_arbitrary_bytes(data: bytes):
    check_decode(data)


@pytest.mark.reliability
@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.lists(MUTATION, min_size=1, max_size=6))
def test_decode_mutated_valid_images(name: str, ops: list[tuple]):
    check_decode(mutate(SEEDS[name], ops))


# -------------------------------------------------------------------------------------- spec parsing

# Text without the characters known to break parsing (surrogates: see the xfails below).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=False),
    TEXT,
)
ANY_VALUE = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=10
)
SECTIONS = {
    name: list(field.annotation.model_fields)  # type: ignore[union-attr]
    for name, field in EditSpec.model_fields.items()
    if hasattr(field.annotation, "model_fields")
}
PLAUSIBLE = {  # values of the right shape, so fuzzing reaches the validators behind the type checks
    "queries": st.lists(TEXT, max_size=3),
    "formats": st.lists(st.sampled_from(["jpeg", "PNG", "gif", "tga", ""]), max_size=4),
    "batch_size": st.dictionaries(st.sampled_from([*STAGES, "nope"]), st.integers(-2, 64), max_size=3),
    "pool_size": st.dictionaries(st.sampled_from(STAGES), st.integers(-2, 8), max_size=2),
    "num_gpus": st.dictionaries(st.sampled_from(STAGES), st.floats(-1, 4), max_size=2),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),  # others: see the xfail below
    "num_cpus": st.one_of(st.none(), st.floats(0, 64)),  # inf: see the xfail below
}


@st.composite
def spec_trees(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for top in ("input", "output"):  # usually present, so most trees reach the section validators
        if draw(st.integers(0, 9)):
            data[top] = draw(st.one_of(st.sampled_from(["in", "/data/in/*.jpg", "s3://b/out", "~/x"]), TEXT, ANY_VALUE))
    for top in ("models_dir", "mode"):
        if draw(st.booleans()):
            data[top] = draw(st.one_of(st.sampled_from(["edit", "remove", "models", None]), TEXT, ANY_VALUE))
    for section, keys in SECTIONS.items():
        if draw(st.integers(0, 3)) == 0:
            continue
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(ANY_VALUE)  # a section that is not a mapping
            continue
        body = {}
        for key in draw(st.lists(st.sampled_from([*keys, "typo_key"]), max_size=4, unique=True)):
            body[key] = draw(PLAUSIBLE[key] if key in PLAUSIBLE and draw(st.booleans()) else SCALARS)
        data[section] = body
    return data


def check_spec(parse: Any) -> EditSpec | None:
    """Run a parse step under the contract: an EditSpec, or SpecError; nothing else escapes."""
    TALLY["spec"] += 1
    try:
        spec = parse()
    except SpecError as e:
        TALLY["spec_error"] += 1
        assert str(e)
        return None
    except BaseException:
        TALLY["spec_crash"] += 1
        raise
    TALLY["spec_ok"] += 1
    if isinstance(spec, EditSpec):
        assert len(spec.spec_hash()) == 16
        assert spec.flat()
        again = build_spec(EditSpec, yaml.safe_load(spec.to_yaml()))
        assert again == spec and again.spec_hash() == spec.spec_hash(), "YAML round trip changed the spec"
    return spec


@pytest.mark.reliability
@FUZZ
@given(spec_trees())
def test_build_spec_accepts_or_raises_spec_error(data: dict[str, Any]):
    check_spec(lambda: build_spec(EditSpec, data))


def values_for(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of a field's own type (mostly valid), so fuzzing reaches what runs after validation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([values_for(a) for a in args])
    if origin is list:
        return st.lists(values_for(args[0]), min_size=1, max_size=3)
    if origin is dict:
        return st.dictionaries(st.sampled_from(STAGES), st.integers(1, 16), max_size=3)
    simple = {
        bool: st.booleans(),
        int: st.integers(0, 5000),
        float: st.floats(0, 1),
        str: TEXT,
        type(None): st.none(),
    }
    return simple.get(annotation, SCALARS)


@st.composite
def mostly_valid_trees(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"input": draw(TEXT), "output": draw(TEXT)}
    for section, keys in SECTIONS.items():
        model = EditSpec.model_fields[section].annotation
        for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            data.setdefault(section, {})[key] = draw(values_for(model.model_fields[key].annotation))  # type: ignore[union-attr]
    return data


@pytest.mark.reliability
@FUZZ
@given(mostly_valid_trees())
def test_accepted_specs_hash_flatten_and_round_trip(data: dict[str, Any]):
    check_spec(lambda: build_spec(EditSpec, data))


OVERRIDE_KEYS = st.sampled_from(
    [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + ["input", "output", "mode", "nokey", "", "a..b", "."]
)
OVERRIDE_VALUES = st.one_of(
    TEXT,
    st.sampled_from(
        ["[a, b]", "{x: 1}", "a: b", "!!python/object:os.system", "&a [*a]", "'unterminated", "1e400", "~"]
    ),
)
OVERRIDES = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, OVERRIDE_VALUES), TEXT), max_size=4)


@pytest.mark.reliability
@FUZZ
@given(OVERRIDES)
def test_overrides_apply_or_raise_spec_error(items: list[str]):
    base = {"input": "in", "output": "out", "runtime": {"executor": "local"}}
    check_spec(lambda: build_spec(EditSpec, apply_overrides(base, items)))


@pytest.mark.reliability
@FUZZ
@given(st.one_of(TEXT, st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), spec_trees())), OVERRIDES)
def test_spec_files_load_or_raise_spec_error(tmp_path_factory, text: str, items: list[str]):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    check_spec(lambda: load_edit_spec(path, items))


# ------------------------------------------------------- parse bugs found by fuzzing (regression tests)


def _parse_file(path: Path) -> None:
    load_edit_spec(path)


@pytest.mark.reliability
def test_spec_file_that_is_not_utf8_is_a_spec_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"input: in\noutput: out\ninpaint:\n  prompt: caf\xe9 au lait\n")  # saved as Latin-1
    with pytest.raises(SpecError, match="UTF-8"):
        _parse_file(path)


@pytest.mark.reliability
def test_deeply_nested_yaml_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError):
        apply_overrides({}, ["inpaint.prompt=" + "[" * 5000])


@pytest.mark.reliability
def test_unknown_device_is_a_spec_error():
    with pytest.raises(SpecError, match="runtime.device"):
        build_spec(EditSpec, {"input": "in", "output": "out", "runtime": {"device": "gpu"}})


@pytest.mark.reliability
def test_string_that_is_not_utf8_is_a_spec_error():
    # `--set inpaint.prompt=caf$'\xe9'` from a Latin-1 terminal arrives as a lone surrogate; Arrow and
    # PNG text reject it only after the model work.
    with pytest.raises(SpecError, match="inpaint.prompt"):
        build_spec(EditSpec, {"input": "in", "output": "out", "inpaint": {"prompt": "caf\udce9"}})


@pytest.mark.reliability
def test_infinite_num_cpus_is_a_spec_error():
    assert math.isinf(float("inf"))
    with pytest.raises(SpecError, match="runtime.num_cpus"):
        build_spec(EditSpec, {"input": "in", "output": "out", "runtime": {"num_cpus": float("inf")}})
