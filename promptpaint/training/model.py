"""The trainable side of a diffusion pipeline: frozen base + peft LoRA adapters, and the DreamBooth loss.

One class serves SD 1.x / 2.x / SDXL, text-to-image and inpainting, because the differences are data, not
code paths: SDXL adds a second text encoder and time-id conditioning; an inpainting UNet (9 input channels)
gets the mask and the masked image's latents concatenated to the noisy latents, as the inpainting pipelines
feed it at inference time.

Randomness comes only from the ``torch.Generator`` passed in (noise, timesteps, VAE sampling) and from
torch's global RNG (LoRA dropout), which the loop seeds from (seed, rank, step): a step's result does not
depend on how the run got there, so a resumed run retraces an uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from promptpaint.config import TrainSpec

# The components whose LoRA layers are saved, in diffusers' key prefixes.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraModel:
    """Base pipeline (frozen, ``weight_dtype``) with trainable fp32 LoRA adapters.

    ``pipe`` is the pipeline as ``promptpaint.models.load_model`` returns it: the same loading code as inference.
    """

    def __init__(self, pipe: Any, spec: TrainSpec, device: torch.device, weight_dtype: torch.dtype):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.pipe, self.spec, self.device, self.weight_dtype = pipe, spec, device, weight_dtype
        self.unet, self.vae = pipe.unet, pipe.vae
        self.encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.inpaint = int(self.unet.config.in_channels) == 9
        for m in (self.unet, self.vae, *self.encoders):
            m.requires_grad_(False)
        if getattr(self.vae.config, "force_upcast", False) and weight_dtype == torch.float16:
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        lora = spec.lora
        alpha = lora.alpha if lora.alpha is not None else lora.rank
        # LoRA's A matrices start random: seed them, so every worker and every run starts from the same LoRA.
        torch.manual_seed(spec.seed)

        def config(targets: list[str]) -> LoraConfig:
            return LoraConfig(r=lora.rank, lora_alpha=alpha, lora_dropout=lora.dropout, init_lora_weights="gaussian",
                              target_modules=list(targets))  # fmt: skip

        self.unet.add_adapter(config(lora.target_modules))
        if lora.text_encoder:
            for enc in self.encoders:
                enc.add_adapter(config(lora.text_encoder_modules))
        # fp16 / bf16 training keeps the trainable (LoRA) parameters in fp32: the optimizer and the gradient
        # scaler never see half-precision parameters ("attempting to unscale FP16 gradients").
        cast_training_params([self.unet, *self.encoders], dtype=torch.float32)
        if spec.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if lora.text_encoder:
                for enc in self.encoders:
                    enc.gradient_checkpointing_enable()
        self.unet.train()
        for enc in self.encoders:
            enc.train(lora.text_encoder)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self._cached: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- parameters
    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(``component.param name``, parameter) of every LoRA parameter, in a fixed order."""
        out = []
        for comp in COMPONENTS:
            module = getattr(self.pipe, comp, None)
            if module is None:
                continue
            out += [(f"{comp}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        return out

    def lora_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per component, its LoRA state dict in diffusers' format (what ``save_lora_weights`` takes)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = {}
        for comp in COMPONENTS:
            module = getattr(self.pipe, comp, None)
            if module is not None and getattr(module, "peft_config", None):
                state = get_peft_model_state_dict(module)
                out[comp] = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
                out[comp] = convert_state_dict_to_diffusers(out[comp])
        return out

    # ---------------------------------------------------------------------------------------------- prompts
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, SDXL pooled embeddings or None); cached when the text encoders are frozen."""
        frozen = not self.spec.lora.text_encoder
        key = "\x00".join(prompts)
        if frozen and key in self._cached:
            return self._cached[key]
        with torch.set_grad_enabled(not frozen):
            if self.sdxl:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            else:
                embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
                pooled = None
        if frozen:
            self._cached[key] = (embeds, pooled)
        return embeds, pooled

    # ------------------------------------------------------------------------------------------------- loss
    def losses(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        g: torch.Generator,
        masks: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample noise-prediction loss, (B,) float32.

        pixels (B, 3, H, W) in [-1, 1]; masks (B, 1, H, W) in {0, 1} (1 = repaint) for inpainting UNets;
        time_ids (B, 6) SDXL's (original h, w, crop top, left, target h, w).
        """
        vae_dtype = next(self.vae.parameters()).dtype
        sf = self.vae.config.scaling_factor
        b = pixels.shape[0]
        with torch.no_grad():
            batch = pixels
            if self.inpaint:
                masked = pixels * (masks < 0.5)
                batch = torch.cat([pixels, masked])
            lat = self.vae.encode(batch.to(self.device, vae_dtype)).latent_dist.sample(generator=g)
            lat = (lat * sf).to(self.weight_dtype)
            latents, masked_latents = (lat[:b], lat[b:]) if self.inpaint else (lat, None)
        noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(self.device, latents.dtype)
        steps = int(self.scheduler.config.num_train_timesteps)
        t = torch.randint(0, steps, (b,), generator=g).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        unet_in = noisy
        if self.inpaint:
            m = F.interpolate(masks.to(self.device, latents.dtype), size=latents.shape[-2:])
            unet_in = torch.cat([noisy, m, masked_latents], dim=1)
        embeds, pooled = self.encode(prompts)
        kwargs: dict[str, Any] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(self.device, embeds.dtype)}
        pred = self.unet(unet_in, t, embeds, **kwargs).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.spec.snr_gamma is not None:
            loss = loss * self._snr_weights(t)
        return loss

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023), as diffusers' training scripts compute them."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        gamma = torch.full_like(snr, float(self.spec.snr_gamma))
        weights = torch.minimum(snr, gamma)
        if self.scheduler.config.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights / snr
