"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs (``train_loop``), and its checkpoints.

Data parallelism: Ray Train starts the workers and the process group (gloo on CPU, NCCL on GPU); after the
micro-steps of one optimizer step, the LoRA gradients (a few MB) are averaged across workers with one
all-reduce of a flat buffer. That is what DDP does for these parameters, without DDP's module wrapper, so a
text-encoder LoRA or gradient checkpointing never trips DDP's "unused parameters" / "marked ready twice"
errors, and a parameter without a gradient on one worker counts as zero.

Checkpoints (``ray.train.report(..., checkpoint=...)`` every ``checkpoint_every`` steps and at the end) hold the
LoRA parameters, optimizer, LR scheduler, gradient scaler, RNG states and the step; the last one also holds
the diffusers-format export. Ray Train hands the newest one back (``ray.train.get_checkpoint``) when a
worker group restarts after a failure, or when the same run (storage path + name) is started again.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptpaint.training.data import draw, local_examples, random_mask

ADAPTERS = "adapters.safetensors"
STATE = "state.json"
EXPORT = "export"  # the diffusers-format LoRA inside the final checkpoint


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    return int(np.random.default_rng([seed, rank, step, micro]).integers(0, 2**62))


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler

    from promptpaint.config import TrainJobSpec
    from promptpaint.models import load_model
    from promptpaint.training.model import LoraModel

    job = TrainJobSpec.model_validate(config["spec"])
    spec = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["threads"])))
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config["precision"]]

    loaded = load_model(spec.model, job.models_dir, device, weight_dtype)
    pipe = loaded.model
    model = LoraModel(pipe, spec, device, weight_dtype)
    named = model.named_trainable()
    params = [p for _, p in named]
    broadcast_from_rank0(params, world)  # as DDP does at wrap time: every worker starts from rank 0's LoRA
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = get_scheduler(
        spec.lr_scheduler, optimizer, num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.max_steps
    )
    scaler = torch.amp.GradScaler(device.type) if config["precision"] == "fp16" else None

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = load_state(Path(folder), named, optimizer, scheduler, scaler, config["spec_hash"])

    instance = local_examples(_rows(ray.train.get_dataset_shard("instance")), rank, world)
    klass = []
    if spec.prior_preservation:
        klass = local_examples(_rows(ray.train.get_dataset_shard("class")), rank, world)
    queue = config.get("queue")
    if queue is not None:  # which examples this worker trains on (training.json, and the shard test)
        _send(
            queue, {"rank": rank, "shard": {"instance": [e.index for e in instance], "class": [e.index for e in klass]}}
        )
    side = int(config["resolution"])
    autocast = config["precision"] != "no"
    fault = config.get("fault") or {}

    while step < spec.max_steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        inst_sum = torch.zeros(())
        prior_sum = torch.zeros(())
        for micro in range(spec.gradient_accumulation):
            seed = step_seed(spec.seed, rank, step, micro)
            g = torch.Generator("cpu").manual_seed(seed)
            torch.manual_seed(seed)  # LoRA dropout
            position = (step * spec.gradient_accumulation + micro) * spec.batch_size
            rows = draw(instance, spec.seed, rank, position, spec.batch_size, stream=0)
            prompts = [spec.instance_prompt] * len(rows)
            if klass:
                rows += draw(klass, spec.seed, rank, position, spec.batch_size, stream=1)
                prompts += [spec.class_prompt] * spec.batch_size
            pixels, masks, time_ids = _tensors(rows, spec, model.inpaint, side, seed)
            with torch.autocast(device.type, dtype=weight_dtype, enabled=autocast):
                losses = model.losses(pixels, prompts, g, masks, time_ids)
            n = spec.batch_size
            inst_loss = losses[:n].mean()
            loss = inst_loss
            if klass:
                prior_loss = losses[n:].mean()
                loss = loss + spec.prior_loss_weight * prior_loss
                prior_sum += prior_loss.detach().float().cpu() / spec.gradient_accumulation
            inst_sum += inst_loss.detach().float().cpu() / spec.gradient_accumulation
            loss = loss / spec.gradient_accumulation
            (scaler.scale(loss) if scaler else loss).backward()
        all_reduce_mean(params, world)
        optimizer_step(params, optimizer, scaler)
        scheduler.step()
        step += 1
        inst_total, prior_total = float(inst_sum), float(prior_sum)

        if fault.get("step") == step and rank == world - 1 and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text("injected")
            raise RuntimeError(f"injected worker fault at step {step} (test hook)")

        metrics = {
            "step": step,
            "loss": inst_total + spec.prior_loss_weight * prior_total,
            "instance_loss": inst_total,
            "prior_loss": prior_total,
            "lr": float(scheduler.get_last_lr()[0]),
            "step_s": time.perf_counter() - t0,
        }
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"loss is not finite at step {step}: {metrics}")
        last = step == spec.max_steps
        images: list[bytes] = []
        if rank == 0 and spec.validation_prompts and (step % spec.validation_every == 0 or last):
            images = validation_images(model, spec, side, instance)
        if rank == 0 and queue is not None:
            _send(queue, {**metrics, "rank": rank, "validation": images})
        if step % spec.checkpoint_every == 0 or last:
            _report(metrics, rank, step, named, optimizer, scheduler, scaler, config, model if last else None)


def optimizer_step(params: list[torch.nn.Parameter], optimizer: Any, scaler: Any) -> None:
    """Clip the (unscaled) gradients to norm 1 and step; with fp16's GradScaler, through it."""
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _send(queue: Any, item: dict[str, Any]) -> None:
    """Hand an item to the driver's queue without waiting for the round trip (calls from one worker to the
    queue actor keep their order)."""
    queue.actor.put_nowait.remote(item)


def _rows(shard: Any) -> list[dict[str, Any]]:
    return list(shard.iter_rows()) if shard is not None else []


def _tensors(
    rows: list[Any], spec: Any, inpaint: bool, side: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pixels (B, 3, S, S) in [-1, 1] (randomly flipped), masks (B, 1, S, S) for inpainting, SDXL time ids."""
    rng = np.random.default_rng([seed, 1])
    images, masks, ids = [], [], []
    for ex in rows:
        img, mask = ex.image, ex.mask
        if mask is None and inpaint:
            mask = random_mask(side, rng)
        if spec.random_flip and rng.random() < 0.5:
            img = img[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        images.append(np.ascontiguousarray(img))
        masks.append(np.ascontiguousarray(mask) if mask is not None else None)
        ids.append(ex.time_ids)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mask_t = None
    if inpaint:
        mask_t = torch.from_numpy((np.stack(masks) > 127).astype(np.float32))[:, None]
    return pixels, mask_t, torch.tensor(ids, dtype=torch.float32)


def broadcast_from_rank0(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1 or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def all_reduce_mean(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` across workers with one all-reduce (missing gradients count as 0)."""
    if world == 1 or not torch.distributed.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        reduced = flat[offset : offset + n].view_as(g)
        # A parameter no worker used (SDXL never reads its first text encoder's last layer) keeps no gradient,
        # as on one worker, so the optimizer leaves it alone.
        p.grad = None if p.grad is None and not bool(reduced.any()) else reduced.clone()
        offset += n


# ---------------------------------------------------------------------------------------------- checkpoints


def save_state(
    folder: Path,
    step: int,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    spec_hash: str,
) -> None:
    from safetensors.torch import save_file

    save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, str(folder / ADAPTERS))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / "scaler.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / "rng.pt")
    (folder / STATE).write_text(json.dumps({"step": step, "spec_hash": spec_hash}))


def load_state(
    folder: Path,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    spec_hash: str,
) -> int:
    """Restore a checkpoint written by ``save_state``; returns its step."""
    from safetensors.torch import load_file

    state = json.loads((folder / STATE).read_text())
    if state.get("spec_hash") != spec_hash:
        raise RuntimeError(
            f"checkpoint {folder} belongs to another training spec ({state.get('spec_hash')} != {spec_hash})"
        )
    tensors = load_file(str(folder / ADAPTERS))
    missing = [n for n, _ in named if n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint {folder} lacks {len(missing)} LoRA parameters, e.g. {missing[0]}")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[n].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=False))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def _report(
    metrics: dict[str, Any],
    rank: int,
    step: int,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    config: dict[str, Any],
    final_model: Any,
) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (the parameters are identical on every worker)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=f"checkpoint_{step:08d}")
        return
    with tempfile.TemporaryDirectory(prefix="promptpaint-ckpt-") as tmp:
        folder = Path(tmp)
        save_state(folder, step, named, optimizer, scheduler, scaler, config["spec_hash"])
        if final_model is not None:
            export_lora(final_model, folder / EXPORT)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{step:08d}"
        )


def export_lora(model: Any, folder: Path) -> Path:
    """The LoRA in diffusers' format (``pytorch_lora_weights.safetensors``, with its LoraConfig as metadata)."""
    from peft.utils import get_peft_model_state_dict  # noqa: F401 - imported by lora_layers; fail early if absent

    layers = model.lora_layers()
    cls = type(model.pipe)
    kwargs: dict[str, Any] = {"unet_lora_layers": layers.get("unet")}
    meta: dict[str, Any] = {"unet_lora_adapter_metadata": model.unet.peft_config["default"].to_dict()}
    if "text_encoder" in layers:
        kwargs["text_encoder_lora_layers"] = layers["text_encoder"]
        meta["text_encoder_lora_adapter_metadata"] = model.encoders[0].peft_config["default"].to_dict()
    if "text_encoder_2" in layers:
        kwargs["text_encoder_2_lora_layers"] = layers["text_encoder_2"]
        meta["text_encoder_2_lora_adapter_metadata"] = model.encoders[1].peft_config["default"].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(folder), safe_serialization=True, **kwargs, **meta)
    return folder


@torch.no_grad()
def validation_images(model: Any, spec: Any, side: int, instance: list[Any]) -> list[bytes]:
    """One PNG per validation prompt, fixed seeds, with the LoRA as trained so far (inpainting bases repaint the
    first instance photo's mask, or its centre)."""
    from PIL import Image

    from promptpaint.actors.generator import to_uint8

    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    model.unet.eval()
    try:
        out = []
        for k, prompt in enumerate(spec.validation_prompts):
            kwargs: dict[str, Any] = {}
            if model.inpaint:
                ex = instance[0]
                mask = ex.mask
                if mask is None:
                    mask = np.zeros((side, side), np.uint8)
                    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
                kwargs = {"image": Image.fromarray(ex.image), "mask_image": Image.fromarray(mask)}
            result = pipe(
                prompt=prompt,
                height=side,
                width=side,
                num_inference_steps=spec.validation_steps,
                generator=torch.Generator("cpu").manual_seed(spec.seed + k),
                output_type="np",
                **kwargs,
            ).images
            buf = io.BytesIO()
            Image.fromarray(to_uint8(result)[0]).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
    finally:
        model.unet.train()
