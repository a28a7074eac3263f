"""The baseline: the loop a user would write WITHOUT promptpaint, with plain transformers + diffusers.

One image at a time: PIL open -> OWLv2 (processor + model, ``post_process_grounded_object_detection``,
the best box) -> SAM with that box (best of its three masks) -> Stable Diffusion inpainting on a padded
crop around the mask, resized to the pipeline's size -> resized back -> pasted with the mask -> PNG.
Models load once with ``from_pretrained`` from local folders (``<models_dir>/owlv2``, ``sam``,
``sd15-inpaint``); default torch threads; ``torch.inference_mode()``. Idiomatic code from the libraries'
documentation, neither deliberately slow nor specially tuned. It does less than promptpaint (no mask
dilation/feathering, no alpha, no metadata, no manifest, no resume, one query and one object), which is
the point of comparison: what the extra work and the Ray wiring cost or save end to end.

Images without a detection above the threshold are not written (counted as ``no_detection``).

Prints one JSON line (``run_plain``'s stats). Usage:
  python benchmarks/plain_loop.py INPUT_DIR OUTPUT_DIR --models-dir DIR [--query "a person"] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

T_START = time.perf_counter()  # before the heavy imports: a user's script pays them too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionInpaintPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Owlv2ForObjectDetection, Owlv2Processor, SamModel, SamProcessor  # noqa: E402

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
PROMPT = "a red vintage bicycle, photorealistic"
NEGATIVE = "blurry, low quality, distorted"


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS)


def crop_box(mask: np.ndarray, padding: float) -> tuple[int, int, int, int]:
    """Square window around the mask (its longer side + ``padding`` on each side), inside the image."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = int(max(y1 - y0, x1 - x0) * (1 + 2 * padding))
    ch, cw = min(side, h), min(side, w)
    top = int(min(max((y0 + y1 - ch) // 2, 0), h - ch))
    left = int(min(max((x0 + x1 - cw) // 2, 0), w - cw))
    return left, top, left + cw, top + ch


def run_plain(
    inputs: list[str | Path] | str | Path,
    output: str | Path,
    models_dir: str | Path,
    query: str = "a person",
    prompt: str = PROMPT,
    negative_prompt: str = NEGATIVE,
    steps: int = 4,
    threshold: float = 0.1,
    top_k: int = 1,
    guidance_scale: float = 7.5,
    padding: float = 0.25,
    seed: int = 0,
    input_root: str | Path | None = None,
) -> dict:
    """Run the plain loop over ``inputs`` (a folder or a list of files); returns timing stats.

    ``top_k`` objects (by detector score) are merged into the mask; the benchmark uses 1.
    Outputs are ``<output>/<path relative to the input root>.png``.
    """
    t_call = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        input_root = Path(inputs)
        inputs = list_images(inputs)
    paths = [Path(p) for p in inputs]
    root = Path(input_root) if input_root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    models_dir = Path(models_dir)
    output = Path(output)

    # Load the models once.
    processor = Owlv2Processor.from_pretrained(models_dir / "owlv2")
    detector = Owlv2ForObjectDetection.from_pretrained(models_dir / "owlv2").eval()
    sam_processor = SamProcessor.from_pretrained(models_dir / "sam")
    sam = SamModel.from_pretrained(models_dir / "sam").eval()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models_dir / "sd15-inpaint", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # 512 for SD 1.5
    t_loaded = time.perf_counter()

    stage_s = dict.fromkeys(("read", "detect", "segment", "inpaint", "write"), 0.0)
    edited = no_detection = 0
    t_first = None
    with torch.inference_mode():
        for n, path in enumerate(paths):
            t = time.perf_counter()
            image = Image.open(path).convert("RGB")
            w, h = image.size
            t1 = time.perf_counter()
            stage_s["read"] += t1 - t

            # 1. Detect: OWLv2 boxes are relative to the image padded to a square.
            inputs_owl = processor(text=[[query]], images=image, return_tensors="pt")
            outputs = detector(**inputs_owl)
            result = processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=[(max(h, w), max(h, w))]
            )[0]
            t2 = time.perf_counter()
            stage_s["detect"] += t2 - t1
            if len(result["scores"]) == 0:
                no_detection += 1
                continue
            best = result["scores"].argsort(descending=True)[:top_k]
            boxes = result["boxes"][best].clamp(min=0)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(max=w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(max=h)

            # 2. Segment: SAM prompted with the box(es); keep the mask SAM scores best.
            sam_inputs = sam_processor(image, input_boxes=[boxes.tolist()], return_tensors="pt")
            sam_out = sam(**sam_inputs)
            masks = sam_processor.image_processor.post_process_masks(
                sam_out.pred_masks, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"]
            )[0]  # (boxes, 3, H, W) bool
            pick = sam_out.iou_scores[0].argmax(-1)  # best of the 3 candidates, per box
            mask = masks[torch.arange(len(pick)), pick].any(0).numpy()
            t3 = time.perf_counter()
            stage_s["segment"] += t3 - t2
            if not mask.any():
                no_detection += 1
                continue

            # 3. Inpaint a padded crop around the mask at the pipeline's size, then paste it back.
            box = crop_box(mask, padding)
            crop = image.crop(box)
            mask_crop = Image.fromarray(mask[box[1] : box[3], box[0] : box[2]].astype(np.uint8) * 255)
            painted = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=crop.resize((size, size), Image.LANCZOS),
                mask_image=mask_crop.resize((size, size), Image.NEAREST),
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            image.paste(painted.resize(crop.size, Image.LANCZOS), box[:2], mask_crop)
            t4 = time.perf_counter()
            stage_s["inpaint"] += t4 - t3

            # 4. Save next to the others, keeping the input's relative path.
            out = (output / path.relative_to(root)).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out)
            stage_s["write"] += time.perf_counter() - t4
            edited += 1
            if t_first is None:
                t_first = time.perf_counter()
                n_first = n + 1

    t_end = time.perf_counter()
    total = len(paths)
    steady = total - n_first if t_first is not None else 0
    return {
        "images": total,
        "edited": edited,
        "no_detection": no_detection,
        "load_s": round(t_loaded - t_call, 3),
        "loop_s": round(t_end - t_loaded, 3),
        "loop_img_s": round(total / (t_end - t_loaded), 3),
        "steady_img_s": round(steady / (t_end - t_first), 3) if steady else None,
        "stage_ms_per_image": {k: round(1000 * v / max(total, 1), 1) for k, v in stage_s.items()},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--query", default="a person")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--negative-prompt", default=NEGATIVE)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stats = run_plain(
        args.input,
        args.output,
        args.models_dir,
        query=args.query,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        threshold=args.threshold,
        top_k=args.top_k,
        seed=args.seed,
    )
    stats["process_s"] = round(time.perf_counter() - T_START, 3)  # imports included
    print(json.dumps({"benchmark": "plain_loop", **stats}))


if __name__ == "__main__":
    main()
