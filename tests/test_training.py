"""DreamBooth-LoRA training (issue 11): spec, LoRA model, Ray Train runs with 2 gloo workers, resume, faults,
inpainting with the subject's own masks, class-image cache, and the LoRA used by the bulk job and generate.

The Ray runs share one module-scoped uninterrupted reference run; resumed and fault-recovered runs of the same
spec must end with exactly its LoRA tensors.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from promptpaint.config import EditSpec, GenerateSpec, SpecError, TrainJobSpec, build_spec, load_train_spec
from promptpaint.io import read_image_text
from promptpaint.lora import LORA_FILE, inspect_lora
from promptpaint.samples import make_photos
from promptpaint.training.data import draw, local_examples, random_mask

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp: Path, models: Path, photos: Path, **train) -> TrainJobSpec:
    base = {
        "model": "sd15",
        "instance_data": str(photos),
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of a dog",
        "prior_preservation": False,
        "max_steps": 6,
        "checkpoint_every": 3,
        "learning_rate": 0.01,
        "num_workers": 2,
        "seed": 3,
    }
    data = {"output": str(tmp), "models_dir": str(models), "train": {**base, **train}, "lineage": {"mode": "off"}}
    return build_spec(TrainJobSpec, data)


@pytest.fixture(scope="module")
def dog_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dog")
    make_photos(folder, 3, (0.02, 0.06), seed=5)
    return folder


# ------------------------------------------------------------------------------------------------ the spec


def test_train_spec_errors_name_the_field(tmp_path, dog_photos):
    spec = tmp_path / "t.yaml"
    spec.write_text(f"output: out\ntrain:\n  instance_data: {dog_photos}\n")
    assert load_train_spec(spec).output == str(tmp_path / "out")  # relative to the spec file
    with pytest.raises(SpecError, match=r"train\.lerning_rate: unknown key"):
        load_train_spec(spec, ["train.lerning_rate=1"])
    with pytest.raises(SpecError, match="not a trainable diffusion model"):
        load_train_spec(spec, ["train.model=owlv2"])
    with pytest.raises(SpecError, match="masks=auto needs an inpainting base"):
        load_train_spec(spec, ["train.masks=auto"])
    with pytest.raises(SpecError, match="fp16 needs GPUs"):
        load_train_spec(spec, ["train.mixed_precision=fp16", "train.use_gpu=false"])
    with pytest.raises(SpecError, match="multiple of 8"):
        load_train_spec(spec, ["train.resolution=100"])
    job = load_train_spec(spec, ["train.model=sd2-inpaint"])
    with pytest.raises(SpecError, match="class_model"):
        job.train.resolved_class_model()
    assert load_train_spec(spec, ["train.model=sdxl-inpaint"]).train.resolved_class_model() == "sdxl"
    assert job.train.resolved_mask_query() == "dog"


def test_the_example_spec_loads_and_plans(tiny_models, dog_photos):
    from promptpaint.training.job import describe_training

    job = load_train_spec(ROOT / "examples" / "dreambooth.yaml",
                          [f"train.instance_data={dog_photos}", f"models_dir={tiny_models}"])  # fmt: skip
    assert job.output == str(ROOT / "runs" / "sks-dog") and job.train.instance_prompt == "a photo of sks dog"
    text = describe_training(job)
    assert "3 instance, 100 class images (sd15)" in text and "steps: 400" in text


def test_spec_hash_ignores_where_the_run_is_stored(tmp_path, tiny_models, dog_photos):
    a = _job(tmp_path / "a", tiny_models, dog_photos)
    b = _job(tmp_path / "b", tiny_models, dog_photos, storage_path=str(tmp_path / "s"), run_name="x")
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != _job(tmp_path / "a", tiny_models, dog_photos, learning_rate=0.02).spec_hash()
    assert a.spec_hash() != a.with_identity({"weights": "w"}).spec_hash()


def test_plan_and_dry_run(tmp_path, tiny_models, dog_photos):
    from promptpaint.jobs.plan import ClusterShape, NodeShape
    from promptpaint.training.job import plan_training

    job = _job(tmp_path, tiny_models, dog_photos, prior_preservation=True, num_class_images=10)
    p = plan_training(job, ClusterShape((NodeShape(4.0),)), 3)
    assert (p.use_gpu, p.precision, p.resolution, p.global_batch, p.class_model) == (False, "no", 64, 2, "sd15")
    assert 0 < p.memory_gb < 2  # the tiny set's own parameter count, not SD 1.5's
    gpu = plan_training(job, ClusterShape((NodeShape(8.0, 2.0),)), 3)
    assert (gpu.use_gpu, gpu.precision) == (True, "fp16")
    with pytest.raises(SpecError, match="needs 4 GPUs"):
        plan_training(_job(tmp_path, tiny_models, dog_photos, num_workers=4), ClusterShape((NodeShape(8, 2),)), 3)
    with pytest.raises(SpecError, match="cpus_per_worker"):
        plan_training(_job(tmp_path, tiny_models, dog_photos, cpus_per_worker=9), ClusterShape((NodeShape(4),)), 3)
    from tests.test_cli import cli

    spec = tmp_path / "t.yaml"
    spec.write_text(json.dumps(job.model_dump(mode="json")))
    res = cli("train", str(spec), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "2 x CPU" in res.stdout and "3 instance, 10 class images (sd15)" in res.stdout
    res = cli("train", str(spec), "--set", "train.lora.rnk=3")
    assert res.returncode == 2 and "train.lora.rnk" in res.stderr


# ----------------------------------------------------------------------------------------------- the data


def test_workers_draw_disjoint_shards_deterministically():
    rows = [{"index": k, "image": np.zeros((4, 4, 3), np.uint8), "mask": np.zeros((0, 0)), "time_ids": [0] * 6}
            for k in range(5)]  # fmt: skip
    r0, r1 = local_examples(rows, 0, 2), local_examples(rows[::-1], 1, 2)
    assert [e.index for e in r0] == [0, 2, 4] and [e.index for e in r1] == [1, 3]
    assert [e.index for e in local_examples(rows[:1], 1, 2)] == [0]  # fewer examples than workers
    a = [e.index for e in draw(r0, 0, 0, 0, 9, 0)]
    assert sorted(a[:3]) == [0, 2, 4] and sorted(a[3:6]) == [0, 2, 4]  # each pass is a permutation
    assert [e.index for e in draw(r0, 0, 0, 4, 5, 0)] == a[4:]  # the draw at a position is fixed
    m = random_mask(64, np.random.default_rng(0))
    assert m.dtype == np.uint8 and 0.05 < (m > 0).mean() < 0.95


def test_lora_model_trains_only_the_adapters(tiny_models):
    from promptpaint.models import load_model
    from promptpaint.training.model import LoraModel

    spec = _job(Path("/tmp/unused"), tiny_models, Path("/tmp/unused")).train
    pipe = load_model("sd15-inpaint", str(tiny_models), torch.device("cpu"), torch.float32).model
    model = LoraModel(pipe, spec, torch.device("cpu"), torch.float32)
    named = model.named_trainable()
    assert named and all("lora_" in n for n, _ in named)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    masks = torch.from_numpy(np.stack([random_mask(64, np.random.default_rng(k)) > 0 for k in range(2)]))
    for step in range(2):
        loss = model.losses(pixels, ["a photo of sks dog"] * 2, torch.Generator().manual_seed(step),
                            masks[:, None].float()).mean()  # fmt: skip
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(p, lora[n]) for n, p in named)
    assert all(torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------ LoRA checking


def _fake_lora(path: Path, width: int, meta: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    metadata = {"format": "pt", **({"promptpaint": json.dumps(meta)} if meta else {})}
    save_file({key: torch.zeros(4, width)}, str(path / LORA_FILE), metadata=metadata)
    return path


def test_lora_for_another_architecture_is_a_spec_error_naming_both(tmp_path):
    xl = _fake_lora(tmp_path / "xl", 2048)
    sd1 = _fake_lora(tmp_path / "sd1", 768)
    tagged = _fake_lora(tmp_path / "tagged", 32, {"arch": "sd2", "base_model": "sd2-inpaint"})
    assert inspect_lora(str(xl)).arch == "sdxl" and inspect_lora(str(sd1)).arch == "sd1"
    with pytest.raises(
        SpecError, match=r"inpaint\.lora\[0\]: .*xl is an SDXL LoRA; the model 'sd15-inpaint' is SD 1.x"
    ):
        build_spec(EditSpec, {"input": "a", "output": "b", "inpaint": {"lora": [str(xl)]}})
    with pytest.raises(SpecError, match=r"SD 2.x LoRA, trained on sd2-inpaint; the model 'sdxl' is SDXL"):
        build_spec(GenerateSpec, {"model": "sdxl", "lora": [{"path": str(tagged), "scale": 0.5}]})
    with pytest.raises(SpecError, match="no LoRA at"):
        build_spec(EditSpec, {"input": "a", "output": "b", "inpaint": {"lora": [str(tmp_path / "nothing")]}})
    ok = build_spec(EditSpec, {"input": "a", "output": "b", "inpaint": {"lora": [{"path": str(sd1), "scale": 0.9}]}})
    assert ok.inpaint.lora[0].scale == 0.9
    plain = build_spec(EditSpec, {"input": "a", "output": "b"})
    assert "lora" not in plain.model_dump()["inpaint"]  # specs without LoRAs keep their old hash


# ---------------------------------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models, dog_photos, ray_session):
    """An uninterrupted 6-step, 2-worker run with prior preservation (class images into a shared cache) and an
    offline Comet experiment."""
    from promptpaint.training.job import run_training

    tmp = tmp_path_factory.mktemp("reference")
    cache = tmp_path_factory.mktemp("class-cache")
    job = _job(tmp / "out", tiny_models, dog_photos, prior_preservation=True, num_class_images=4, class_steps=1,
               class_data=str(cache), validation_prompts=["a photo of sks dog"], validation_every=3,
               validation_steps=1)  # fmt: skip
    job = job.model_copy(update={"lineage": job.lineage.model_copy(update={"mode": "offline"})})
    result = run_training(job, progress=False)
    return job, result, cache


@pytest.mark.heavy
def test_two_gloo_workers_train_a_lora_that_diffusers_loads(reference, tiny_models):
    job, result, _ = reference
    assert result.steps == 6 and len(result.losses) == 6 and all(np.isfinite(result.losses))
    assert result.class_generated == 4
    inst = [set(result.shards[r]["instance"]) for r in (0, 1)]
    assert inst[0] and inst[1] and not inst[0] & inst[1]  # both workers, different shards
    out = Path(job.output)
    for name in (LORA_FILE, "README.md", "train.yaml", "training.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "a photo of sks dog" in card and "Final loss" in card and "validation/step-000006-0.png" in card
    archives = list((out / "comet").glob("*.zip"))
    assert len(archives) == 1  # one experiment for the run
    import zipfile

    with zipfile.ZipFile(archives[0]) as z:
        blob = "".join(z.read(n).decode("utf-8", "replace") for n in z.namelist() if n.endswith(".json"))
    assert '"instance_loss"' in blob and LORA_FILE in blob  # per-step metrics and the LoRA asset
    info = inspect_lora(str(out))
    assert info.arch == "sd1" and info.run["run_name"] == "out" and info.sha256 == result.lora_sha256
    assert result.effect > 0

    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    def image(pipe, **kw):
        return pipe(prompt="a photo of sks dog", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np", **kw).images[0]  # fmt: skip

    for cls, name, kw in (
        (StableDiffusionPipeline, "sd15", {}),
        (StableDiffusionInpaintPipeline, "sd15-inpaint",
         {"image": Image.new("RGB", (64, 64), (120, 80, 40)), "mask_image": Image.new("L", (64, 64), 255)}),
    ):  # fmt: skip
        pipe = cls.from_pretrained(str(tiny_models / name), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        before = image(pipe, **kw)
        pipe.load_lora_weights(str(out))  # stock diffusers, the folder as users pass it
        assert np.abs(image(pipe, **kw) - before).max() > 1e-4, name


@pytest.mark.heavy
def test_the_lora_in_generate_and_the_bulk_job(reference, tiny_models, tmp_path):
    from promptpaint.config import RuntimeSpec
    from promptpaint.jobs.bulk_edit import run_job
    from promptpaint.jobs.generate import run_generate
    from promptpaint.manifest import read_manifest

    job, result, _ = reference
    runtime = build_spec(RuntimeSpec, {"device": "cpu"})
    plain = build_spec(GenerateSpec, {"steps": 2})
    tuned = build_spec(GenerateSpec, {"steps": 2, "lora": [job.output]})
    a = run_generate(plain, runtime, ["a photo of sks dog"], 1, str(tmp_path / "gen"), str(tiny_models), False)
    b = run_generate(tuned, runtime, ["a photo of sks dog"], 1, str(tmp_path / "gen"), str(tiny_models), False)
    assert a.written != b.written  # a LoRA writes new files, never over the plain ones
    pa, pb = (np.asarray(Image.open(p[0])) for p in (a.written, b.written))
    assert not np.array_equal(pa, pb)
    text = read_image_text(Path(b.written[0]).read_bytes())
    assert json.loads(text["promptpaint:lora"])[0]["sha256"] == result.lora_sha256

    photos = tmp_path / "photos"
    make_photos(photos, 2, (0.02, 0.05), seed=9)
    base = {"input": str(photos), "models_dir": str(tiny_models), "detect": {"queries": ["dog"], "threshold": 0.0},
            "inpaint": {"steps": 2, "prompt": "a photo of sks dog"}, "lineage": {"mode": "off"},
            "runtime": {"executor": "local"}}  # fmt: skip
    e0 = build_spec(EditSpec, {**base, "output": str(tmp_path / "e0")})
    lora = [{"path": job.output, "scale": 0.9}]
    e1 = build_spec(EditSpec, {**base, "output": str(tmp_path / "e1"),
                               "inpaint": {**base["inpaint"], "lora": lora}})  # fmt: skip
    r0, r1 = run_job(e0, progress=False), run_job(e1, progress=False)
    assert r0.counts["edited"] == r1.counts["edited"] == 2
    t1 = read_manifest(e1.output)
    rec = json.loads(t1.column("model.inpaint.lora")[0].as_py())
    assert rec[0]["sha256"] == result.lora_sha256 and rec[0]["scale"] == 0.9 and rec[0]["run_name"] == "out"
    assert set(read_manifest(e0.output).column("id").to_pylist()).isdisjoint(t1.column("id").to_pylist())
    out_png = Path(t1.column("output_path")[0].as_py()).read_bytes()
    assert result.lora_sha256 in read_image_text(out_png)["promptpaint:models"]


def _lora_tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / LORA_FILE))


@pytest.mark.heavy
def test_stop_and_resume_ends_with_the_same_lora(reference, tiny_models, dog_photos, tmp_path):
    from promptpaint.training.job import TrainingFailed, run_training

    ref_job, ref, cache = reference
    job = _job(tmp_path / "out", tiny_models, dog_photos, prior_preservation=True, num_class_images=4,
               class_steps=1, class_data=str(cache), max_failures=0, validation_prompts=["a photo of sks dog"],
               validation_every=3, validation_steps=1)  # fmt: skip
    fault = {"step": 4, "marker": str(tmp_path / "fault-once")}
    with pytest.raises(TrainingFailed, match="injected worker fault"):
        run_training(job, progress=False, fault=fault)  # dies after checkpoint 3
    assert (tmp_path / "out" / "ray" / "out" / "checkpoint_00000003").is_dir()
    resumed = run_training(job, progress=False, fault=fault)  # the same command again
    assert resumed.resumed_from == 3 and resumed.steps == 6 and resumed.class_generated == 0
    a, b = _lora_tensors(ref_job.output), _lora_tensors(job.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_training(job, progress=False)
    assert again.already_done and again.lora_sha256 == resumed.lora_sha256


@pytest.mark.heavy
def test_a_worker_crash_is_recovered_from_the_last_checkpoint(reference, tiny_models, dog_photos, tmp_path):
    from promptpaint.training.job import run_training

    ref_job, ref, cache = reference
    job = _job(tmp_path / "out", tiny_models, dog_photos, prior_preservation=True, num_class_images=4,
               class_steps=1, class_data=str(cache), max_failures=1, validation_prompts=["a photo of sks dog"],
               validation_every=3, validation_steps=1)  # fmt: skip
    marker = tmp_path / "fault-once"
    result = run_training(job, progress=False, fault={"step": 5, "marker": str(marker)})
    assert marker.is_file() and result.steps == 6  # the worker raised once; Ray Train restarted the group
    a, b = _lora_tensors(ref_job.output), _lora_tensors(job.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.heavy
def test_a_different_spec_in_the_same_run_folder_is_refused(reference, tiny_models, dog_photos):
    from promptpaint.training.job import run_training

    ref_job, _, _ = reference
    other = _job(Path(ref_job.output), tiny_models, dog_photos, learning_rate=0.02)
    with pytest.raises(SpecError, match="holds checkpoints of another training spec"):
        run_training(other, progress=False)


@pytest.mark.heavy
def test_inpainting_lora_with_the_subjects_own_masks(tiny_models, dog_photos, tmp_path, ray_session):
    from promptpaint.coco import decode_rle
    from promptpaint.manifest import read_manifest
    from promptpaint.training.job import run_training

    job = _job(tmp_path / "out", tiny_models, dog_photos, model="sd15-inpaint", masks="auto", mask_threshold=0.0,
               num_workers=1, max_steps=2, checkpoint_every=2)  # fmt: skip
    result = run_training(job, progress=False)
    am = result.automask
    assert am["query"] == "dog" and not am["without"] and len(am["areas"]) == 3
    table = read_manifest(am["output"])  # the masking run's manifest, kept with the LoRA
    assert table is not None and set(table.column("status").to_pylist()) == {"segmented"}
    for row in table.select(["input_path", "rles", "mask_path"]).to_pylist():
        union = np.logical_or.reduce([decode_rle(rle) for rle in row["rles"]])
        assert int(union.sum()) == am["areas"][row["input_path"]]
        label = np.asarray(Image.open(io.BytesIO(Path(row["mask_path"]).read_bytes())))
        assert int((label > 0).sum()) == am["areas"][row["input_path"]]
    assert inspect_lora(job.output).run["inpainting"] is True and result.effect > 0
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_models / "sd15-inpaint"), safety_checker=None,
                                                          requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(job.output)
    assert "default_0" in pipe.unet.peft_config


@pytest.mark.parametrize("name", ["sdxl", "sdxl-inpaint", "sd2-inpaint"])
def test_other_architectures_train_and_export_a_loadable_lora(name, tiny_models, tmp_path):
    """SDXL (two text encoders, time ids, text-encoder LoRAs on both) and SD2: a step, export, stock reload."""
    import diffusers

    from promptpaint.models import get_entry, load_model
    from promptpaint.training.loop import export_lora
    from promptpaint.training.model import LoraModel

    spec = _job(tmp_path, tiny_models, tmp_path, model=name, lora={"text_encoder": True, "rank": 2}).train
    pipe = load_model(name, str(tiny_models), torch.device("cpu"), torch.float32).model
    model = LoraModel(pipe, spec, torch.device("cpu"), torch.float32)
    comps = {n.split(".", 1)[0] for n, _ in model.named_trainable()}
    assert comps == ({"unet", "text_encoder", "text_encoder_2"} if "sdxl" in name else {"unet", "text_encoder"})
    named = model.named_trainable()
    opt = torch.optim.AdamW([p for _, p in named], lr=5e-2)
    masks = torch.ones(1, 1, 64, 64) if model.inpaint else None
    ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    for step in range(2):
        loss = model.losses(torch.rand(1, 3, 64, 64) * 2 - 1, ["a photo of sks dog"],
                            torch.Generator().manual_seed(step), masks, ids).mean()  # fmt: skip
        opt.zero_grad()
        loss.backward()
        unused = {n for n, p in named if p.grad is None}
        # SDXL conditions on the penultimate layer of its first text encoder: the last layer's adapters get no
        # gradient (what trips DDP's unused-parameter check); every other adapter does
        assert unused == ({n for n, _ in named if n.startswith("text_encoder.encoder.layers.1.")}
                          if "sdxl" in name else set())  # fmt: skip
        opt.step()
    folder = export_lora(model, tmp_path / "lora")
    keys = load_file(str(folder / LORA_FILE)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    fresh = getattr(diffusers, get_entry(name).pipeline).from_pretrained(str(tiny_models / name))
    fresh.load_lora_weights(str(folder))
    assert "default_0" in fresh.unet.peft_config and "default_0" in fresh.text_encoder.peft_config


@pytest.mark.heavy
def test_sdxl_text_encoder_lora_on_two_workers(tiny_models, dog_photos, tmp_path, ray_session):
    """Unused adapter parameters (SDXL's first text encoder's last layer) on 2 workers: no DDP-style error."""
    from promptpaint.training.job import run_training

    job = _job(tmp_path / "out", tiny_models, dog_photos, model="sdxl", max_steps=2, checkpoint_every=2,
               lora={"text_encoder": True, "rank": 2})  # fmt: skip
    result = run_training(job, progress=False)
    assert result.steps == 2 and result.effect > 0
    keys = load_file(str(Path(job.output) / LORA_FILE)).keys()
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert inspect_lora(job.output).arch == "sdxl"


@pytest.mark.heavy
def test_a_lora_that_changes_nothing_is_an_error(tiny_models, dog_photos, tmp_path, ray_session):
    from promptpaint.training.job import TrainingFailed, run_training

    job = _job(tmp_path / "out", tiny_models, dog_photos, learning_rate=1e-12, num_workers=1, max_steps=1,
               checkpoint_every=1)  # fmt: skip
    with pytest.raises(TrainingFailed, match="changes nothing"):
        run_training(job, progress=False)
    assert not (tmp_path / "out" / "training.json").exists()  # never reported as done


@pytest.mark.heavy
def test_cli_train_then_rerun_is_already_done(tiny_models, dog_photos, tmp_path):
    from tests.test_cli import cli

    spec = tmp_path / "t.yaml"
    job = _job(tmp_path / "out", tiny_models, dog_photos, num_workers=1, max_steps=2, checkpoint_every=1)
    spec.write_text(json.dumps(job.model_dump(mode="json")))
    res = cli("train", str(spec), "--no-progress", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained 2 steps" in res.stdout and "reload check" in res.stdout
    again = cli("train", str(spec), "--no-progress", timeout=600)
    assert again.returncode == 0 and "already trained" in again.stdout
    other = cli("train", str(spec), "--set", "train.learning_rate=0.02", "--no-progress", timeout=600)
    assert other.returncode == 2 and "another training spec" in other.stderr
