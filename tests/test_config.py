"""EditSpec: defaults, YAML round-trip, ``--set`` overrides, error messages, spec hash, paths and runtime."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from promptpaint.config import (
    STAGES,
    EditSpec,
    InpaintSpec,
    RuntimeSpec,
    SpecError,
    apply_overrides,
    build_spec,
    load_edit_spec,
    parse_override,
)


def _spec(**kw) -> EditSpec:
    return EditSpec(input="/data/in", output="/data/out", **kw)


def _with(overrides: list[str], base: dict | None = None) -> EditSpec:
    data = base or {"input": "/data/in", "output": "/data/out"}
    return build_spec(EditSpec, apply_overrides(data, overrides), source="--set")


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ defaults


def test_editspec_defaults() -> None:
    s = _spec()
    assert (s.input, s.output, s.models_dir, s.mode) == ("/data/in", "/data/out", None, "edit")
    assert s.detect.model == "owlv2" and s.detect.texts == ["car"]
    assert s.detect.threshold == 0.1 and s.detect.top_k == 10
    assert s.segment.model == "sam" and s.segment.multimask == "best" and s.segment.clip_to_box is True
    assert s.segment.points_file is None
    m = s.mask
    assert (m.dilate_px, m.feather_px, m.fill_holes, m.instances, m.invert, m.min_area) == (
        8,
        4,
        True,
        "all",
        False,
        64,
    )
    i = s.inpaint
    assert i.model == "sd15-inpaint" and i.prompt == "a red vintage bicycle"
    assert (i.steps, i.guidance_scale, i.strength, i.seed, i.resolution, i.padding) == (30, 7.5, 1.0, 0, None, 0.25)
    assert s.qc.enabled is False
    assert s.lineage.mode == "auto" and s.lineage.require is False
    r = s.runtime
    assert (r.executor, r.device, r.dtype, r.fuse, r.num_cpus, r.manifest_every) == (
        "ray",
        "auto",
        "auto",
        "auto",
        None,
        256,
    )
    assert r.batch_size == {} and r.pool_size == {} and r.num_gpus == {}
    assert [r.batch(st) for st in STAGES] == [8] * len(STAGES)
    assert s.limits.max_pixels == 40_000_000 and s.limits.max_bytes == 200 * 1024 * 1024
    assert "JPEG" in s.limits.formats and "PNG" in s.limits.formats
    # the default factories give each spec its own lists
    s.detect.queries.append("dog")
    assert _spec().detect.texts == ["car"]


def test_input_and_output_are_required() -> None:
    with pytest.raises(SpecError, match=r"(?s)input.*output|output.*input"):
        build_spec(EditSpec, {}, source="empty.yaml")


def test_sections_validate_values_and_assignment() -> None:
    s = _spec(detect={"queries": ["  a car ", "dog"]}, limits={"formats": ["jpeg", "png"]})
    assert s.detect.texts == ["a car", "dog"]  # stripped
    assert s.limits.formats == ["JPEG", "PNG"]  # upper-cased
    with pytest.raises(ValueError, match="multiple of 8"):
        s.inpaint.resolution = 100  # validate_assignment: no bypassing the checks after construction
    for bad in ({"queries": []}, {"queries": ["car", "  "]}, {"threshold": 1.5}, {"top_k": 0}):
        with pytest.raises(SpecError, match=r"detect\."):
            _spec_from({"detect": bad})


def _spec_from(extra: dict) -> EditSpec:
    return build_spec(EditSpec, {"input": "i", "output": "o", **extra})


# ------------------------------------------------------------------------------------------ YAML round-trip


def test_yaml_round_trip() -> None:
    s = _spec(
        models_dir="/models",
        mode="remove",
        detect={"queries": ["car", "red bus"], "threshold": 0.25, "top_k": 3},
        segment={"multimask": "largest", "clip_to_box": False},
        mask={"dilate_px": 3, "feather_px": 0, "instances": "top1", "invert": True},
        inpaint={"prompt": "a: colon, and 'quotes'", "steps": 5, "resolution": 256, "seed": 2**62},
        runtime={"executor": "local", "batch_size": {"inpaint": 2}, "num_gpus": {"detect": 0.5}},
        limits={"formats": ["PNG"]},
    )
    text = s.to_yaml()
    loaded = EditSpec.model_validate(yaml.safe_load(text))
    assert loaded == s
    assert loaded.spec_hash() == s.spec_hash()
    assert loaded.to_yaml() == text
    assert list(yaml.safe_load(text))[:4] == ["input", "output", "models_dir", "mode"]  # field order kept


def test_yaml_round_trip_through_a_file(tmp_path: Path) -> None:
    s = _spec(inpaint={"steps": 3, "prompt": "ünïcode prompt"}, runtime={"pool_size": {"detect": 2}})
    path = tmp_path / "spec.yaml"
    path.write_text(s.to_yaml())
    assert load_edit_spec(path) == s


def test_flat_keys() -> None:
    flat = _spec(inpaint={"steps": 4}).flat()
    assert flat["inpaint.steps"] == 4 and flat["detect.queries"] == ["car"] and flat["input"] == "/data/in"
    assert flat["runtime.num_cpus"] is None and flat["mask.invert"] is False


# --------------------------------------------------------------------------------------------- overrides


def test_overrides_are_yaml_scalars() -> None:
    s = _with(
        [
            "inpaint.steps=5",
            "detect.queries=[a, b]",
            "mask.invert=true",
            "detect.threshold=0.3",
            "inpaint.prompt='a cat: sitting'",
            "inpaint.negative_prompt=",
            "runtime.batch_size={inpaint: 2, detect: 4}",
            "inpaint.resolution=null",
        ]
    )
    assert s.inpaint.steps == 5 and type(s.inpaint.steps) is int
    assert s.detect.texts == ["a", "b"]
    assert s.mask.invert is True
    assert s.detect.threshold == 0.3
    assert s.inpaint.prompt == "a cat: sitting"  # quoted: a YAML string
    assert s.inpaint.negative_prompt == ""
    assert s.runtime.batch_size == {"inpaint": 2, "detect": 4} and s.runtime.batch("inpaint") == 2
    assert s.inpaint.resolution is None
    assert _with(["inpaint.prompt=a=b"]).inpaint.prompt == "a=b"  # only the first '=' splits
    # Values are YAML, but an unbraced 'key: value' stays the string the user typed; numbers coerce too.
    assert _with(["inpaint.prompt=a cat: sitting"]).inpaint.prompt == "a cat: sitting"
    assert _with(["inpaint.prompt=1984"]).inpaint.prompt == "1984"
    with pytest.raises(SpecError, match=r"inpaint\.prompt"):
        _with(["inpaint.prompt={a: b}"])


def test_parse_override() -> None:
    assert parse_override("inpaint.steps=5") == (["inpaint", "steps"], 5)
    assert parse_override("mask.invert=true") == (["mask", "invert"], True)
    assert parse_override("detect.queries=[a, b]") == (["detect", "queries"], ["a", "b"])
    assert parse_override("inpaint.prompt=x=y") == (["inpaint", "prompt"], "x=y")
    assert parse_override(" a.b =  ") == (["a", "b"], "")
    with pytest.raises(SpecError, match="key.path=value"):
        parse_override("inpaint.steps")
    with pytest.raises(SpecError, match="empty key"):
        parse_override("=3")
    with pytest.raises(SpecError, match=r"inpaint\.prompt.*not valid YAML"):
        parse_override("inpaint.prompt=[unclosed")


def test_overrides_apply_on_top_of_the_file_and_later_wins(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.yaml", {"input": "/in", "output": "/out", "inpaint": {"steps": 7, "prompt": "p"}})
    s = load_edit_spec(path, ["inpaint.steps=5", "inpaint.steps=6", "mask.dilate_px=0"])
    assert s.inpaint.steps == 6 and s.inpaint.prompt == "p" and s.mask.dilate_px == 0
    data = {"input": "/in", "output": "/out", "inpaint": {"steps": 7}}
    apply_overrides(data, ["inpaint.seed=3"])
    assert data["inpaint"] == {"steps": 7, "seed": 3}  # siblings kept, the section merged
    with pytest.raises(SpecError, match=r"inpaint\.steps\.x.*'steps' is a value, not a section"):
        apply_overrides(data, ["inpaint.steps.x=3"])


# ------------------------------------------------------------------------------------------------ errors


def _error(overrides: list[str]) -> str:
    with pytest.raises(SpecError) as info:
        _with(overrides)
    return str(info.value)


def test_unknown_key_names_the_path() -> None:
    msg = _error(["inpaint.promt=a red bike"])
    assert "inpaint.promt" in msg and "unknown key" in msg and "'a red bike'" in msg
    msg = _error(["colour=red"])
    assert re.search(r"^\s*colour: unknown key", msg, re.M)


def test_bad_literal_names_value_and_choices() -> None:
    msg = _error(["mask.instances=biggest"])
    assert "mask.instances" in msg and "'biggest'" in msg
    assert all(f"'{c}'" in msg for c in ("all", "largest", "top1"))


def test_resolution_must_be_multiple_of_8() -> None:
    msg = _error(["inpaint.resolution=100"])
    assert "inpaint.resolution" in msg and "100" in msg and "multiple of 8" in msg
    assert _with(["inpaint.resolution=96"]).inpaint.resolution == 96


def test_runtime_stage_dicts_check_stage_names() -> None:
    msg = _error(["runtime.batch_size={foo: 2}"])
    assert "runtime.batch_size" in msg and "'foo'" in msg
    assert all(st in msg for st in STAGES)  # lists the allowed stages
    msg = _error(["runtime.pool_size={detect: 0}"])
    assert "runtime.pool_size" in msg and "> 0" in msg


def test_several_errors_are_reported_together_with_the_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", {"input": "i", "output": "o", "inpaint": {"steps": 0, "promt": "x"}})
    with pytest.raises(SpecError) as info:
        load_edit_spec(path, ["detect.threshold=2"])
    msg = str(info.value)
    assert str(path) in msg
    assert "inpaint.steps" in msg and "inpaint.promt" in msg and "detect.threshold" in msg
    assert "(given 0)" in msg and "(given 2)" in msg


def test_bad_spec_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_edit_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        load_edit_spec(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_edit_spec(tmp_path / "broken.yaml")


# --------------------------------------------------------------------------------------------- spec hash


def test_spec_hash_is_stable() -> None:
    h = _spec().spec_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert _spec().spec_hash() == h
    assert EditSpec.model_validate(yaml.safe_load(_spec().to_yaml())).spec_hash() == h
    # keys given in another order or defaults given explicitly: same spec, same hash
    assert _spec(inpaint={"seed": 0, "steps": 30}).spec_hash() == h


@pytest.mark.parametrize(
    "override",
    [
        "inpaint.prompt=a blue bicycle",
        "inpaint.seed=1",
        "inpaint.steps=29",
        "mode=remove",
        "detect.queries=[car, bus]",
        "detect.threshold=0.2",
        "segment.multimask=single",
        "mask.dilate_px=9",
        "mask.invert=true",
        "limits.max_pixels=100",
        "qc.enabled=true",  # adds a score column, and with qc.min_score moves images to rejected/
        "detect.queries=[{text: car, prompt: a bicycle}]",
        "mode=segment",
    ],
)
def test_spec_hash_changes_with_output_fields(override: str) -> None:
    assert _with([override]).spec_hash() != _spec().spec_hash()


@pytest.mark.parametrize(
    "override",
    [
        "runtime.batch_size={inpaint: 2}",
        "runtime.executor=local",
        "runtime.device=cpu",
        "runtime.pool_size={detect: 3}",
        "output=/elsewhere",
        "input=/other/in",
        "models_dir=/models",
        "lineage.mode=offline",
    ],
)
def test_spec_hash_ignores_runtime_and_paths(override: str) -> None:
    assert _with([override]).spec_hash() == _spec().spec_hash()


@pytest.mark.parametrize("override", ["inpaint.prompt=x", "mask.dilate_px=3", "qc.enabled=true"])
def test_detect_and_segment_hash_ignore_edit_sections(override: str) -> None:
    # Boxes and masks do not depend on the inpaint/mask/qc sections: changing them must not redo a labelling run.
    for mode in ("detect", "segment"):
        assert _with([f"mode={mode}", override]).spec_hash() == _with([f"mode={mode}"]).spec_hash()


def test_plain_queries_keep_their_hash_and_yaml() -> None:
    # A query without options serialises as a plain string: specs written before per-query options existed
    # keep their spec hash (and so their manifest ids).
    s = _spec(detect={"queries": ["car", {"text": "dog"}]})
    assert s.model_dump()["detect"]["queries"] == ["car", "dog"]
    assert s.spec_hash() == _spec(detect={"queries": ["car", "dog"]}).spec_hash()
    rich = _spec(detect={"queries": [{"text": "person", "threshold": 0.3, "prompt": "a statue"}]})
    back = EditSpec.model_validate(yaml.safe_load(rich.to_yaml()))
    assert back.detect.queries[0].prompt == "a statue" and back.detect.thresholds() == [0.3]


def test_duplicate_and_empty_queries_are_errors() -> None:
    with pytest.raises(SpecError, match="duplicate queries"):
        _spec_from({"detect": {"queries": ["car", "car"]}})
    with pytest.raises(SpecError, match="non-empty"):
        _spec_from({"detect": {"queries": [{"text": "  "}]}})


def test_edit_prompts_per_query_and_remove() -> None:
    s = _spec(
        detect={"queries": [{"text": "car", "prompt": "a bicycle"}, "dog", {"text": "person", "negative_prompt": "x"}]},
        inpaint={"prompt": "P", "negative_prompt": "N"},
    )
    assert s.edit_prompts() == {
        "car": ("a bicycle", "N"),
        "dog": ("P", "N"),
        "person": ("P", "x"),
        "prompt": ("P", "N"),
    }
    r = _with(["mode=remove", "detect.queries=[car, dog]", "inpaint.negative_prompt=blurry"])
    assert set(r.edit_prompts().values()) == {(r.inpaint.remove_prompt, "blurry, car, dog")}


# ---------------------------------------------------------------------------------------- paths and env


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir = tmp_path / "project" / "specs"
    path = _write(
        spec_dir / "job.yaml",
        {"input": "../images", "output": "out", "models_dir": "models", "inpaint": {"steps": 2}},
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_edit_spec(path)
    assert s.input == str(spec_dir.resolve() / "../images")
    assert Path(s.input).resolve() == (tmp_path / "project" / "images").resolve()
    assert s.output == str(spec_dir.resolve() / "out")
    assert s.models_dir == str(spec_dir.resolve() / "models")
    # a relative spec path works from its own folder too
    monkeypatch.chdir(spec_dir)
    assert load_edit_spec("job.yaml").output == str(spec_dir.resolve() / "out")


def test_absolute_uri_home_and_override_paths_are_kept(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "job.yaml",
        {"input": "s3://bucket/images", "output": "/abs/out", "models_dir": "~/models"},
    )
    s = load_edit_spec(path)
    assert (s.input, s.output, s.models_dir) == ("s3://bucket/images", "/abs/out", "~/models")
    # paths given with --set are relative to the current directory: kept as given, not rebased
    s = load_edit_spec(path, ["output=rel/out", "input=imgs"])
    assert (s.output, s.input) == ("rel/out", "imgs")


def test_models_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTPAINT_MODELS_DIR", raising=False)
    assert _spec().models_dir is None
    monkeypatch.setenv("PROMPTPAINT_MODELS_DIR", "/env/models")
    assert _spec().models_dir == "/env/models"
    assert _spec(models_dir="/explicit").models_dir == "/explicit"  # an explicit value wins
    path = _write(tmp_path / "s" / "job.yaml", {"input": "/i", "output": "/o"})
    assert load_edit_spec(path).models_dir == "/env/models"
    path = _write(tmp_path / "s" / "job2.yaml", {"input": "/i", "output": "/o", "models_dir": "m"})
    assert load_edit_spec(path).models_dir == str((tmp_path / "s").resolve() / "m")
    assert load_edit_spec(path, ["models_dir=/cli"]).models_dir == "/cli"
    monkeypatch.setenv("PROMPTPAINT_MODELS_DIR", "")  # empty means unset
    assert _spec().models_dir is None
    # models_dir is not part of the hash: the same job on another machine keeps its ids
    monkeypatch.setenv("PROMPTPAINT_MODELS_DIR", "/env/models")
    with_env = _spec().spec_hash()
    monkeypatch.delenv("PROMPTPAINT_MODELS_DIR")
    assert _spec().spec_hash() == with_env


# -------------------------------------------------------------------------------------------------- runtime


def test_runtime_resolve_on_cpu() -> None:
    assert RuntimeSpec(device="cpu").resolve() == (torch.device("cpu"), torch.float32)
    assert RuntimeSpec(device="cpu", dtype="bfloat16").resolve() == (torch.device("cpu"), torch.bfloat16)
    assert RuntimeSpec(device="cpu", dtype="float32").resolve() == (torch.device("cpu"), torch.float32)
    # fp16 on an explicit CPU is a spec error when the spec is built, before any job work ...
    with pytest.raises(SpecError, match=r"runtime\.dtype=float16.*CPU"):
        build_spec(RuntimeSpec, {"device": "cpu", "dtype": "float16"})
    # ... and with device auto, as soon as the device is known to be a CPU.
    with pytest.raises(SpecError, match=r"runtime\.dtype=float16.*CPU"):
        RuntimeSpec(dtype="float16").resolve_dtype("cpu")


def test_runtime_resolve_auto_follows_the_machine() -> None:
    dev, dt = RuntimeSpec().resolve()
    if torch.cuda.is_available():
        assert (dev.type, dt) == ("cuda", torch.float16)
    else:
        assert (dev, dt) == (torch.device("cpu"), torch.float32)
        with pytest.raises(SpecError, match="float16"):
            RuntimeSpec(dtype="float16").resolve()


def test_runtime_bounds() -> None:
    with pytest.raises(SpecError, match="runtime.num_cpus"):
        _spec_from({"runtime": {"num_cpus": 0}})
    with pytest.raises(SpecError, match="runtime.executor"):
        _spec_from({"runtime": {"executor": "spark"}})
    with pytest.raises(SpecError, match=r"runtime\.num_gpus"):
        _spec_from({"runtime": {"num_gpus": {"gpu": 1}}})
    r = _spec_from({"runtime": {"batch_size": {"detect": 3}, "pool_size": {"inpaint": 2}}}).runtime
    assert (r.batch("detect"), r.batch("inpaint"), r.pool_size) == (3, 8, {"inpaint": 2})


def test_inpaint_spec_bounds() -> None:
    assert InpaintSpec(seed=2**63 - 1).seed == 2**63 - 1
    for bad in ({"seed": 2**63}, {"seed": -1}, {"strength": 0.0}, {"steps": 0}, {"resolution": 4}):
        with pytest.raises(ValueError):
            InpaintSpec(**bad)
