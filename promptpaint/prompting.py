"""Prompts -> diffusers pipeline keyword arguments, optionally with compel's prompt weighting.

``weighting="none"`` hands the strings to the pipeline (``prompt=`` / ``negative_prompt=``), which encodes
them itself. ``weighting="compel"`` encodes them with compel (https://github.com/damian0815/compel),
which understands weights and operators in the prompt text:

- ``a (red)++ bicycle`` / ``a red++ bicycle``: each ``+`` multiplies the weight by 1.1, each ``-`` by 0.9;
- ``a (red)1.3 bicycle``: an explicit weight;
- ``("a red bicycle", "a blue car").blend(0.7, 0.3)``: a weighted mix of whole prompts;
- ``("a red bicycle", "on a beach").and()``: prompts encoded separately and concatenated.

A prompt without any of this gives the same embeddings as the pipeline's own ``encode_prompt`` (compel
bypasses weighting then). Unlike the pipeline, compel does not cut prompts at 77 tokens: it encodes
them in 77-token chunks; positive and negative embeddings are padded to one length.

SD-family pipelines (one ``tokenizer`` / ``text_encoder``: SD 1.x, SD 2.x) get ``prompt_embeds`` and
``negative_prompt_embeds`` (B, L, D); SDXL-family pipelines (``tokenizer_2`` / ``text_encoder_2`` too) also
get ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (B, D2): penultimate hidden states of
both encoders, not normalised, concatenated on D, pooled output of the second, as SDXL expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Weighting = Literal["none", "compel"]
WEIGHTINGS: tuple[str, ...] = ("none", "compel")


def pipeline_family(pipe: Any) -> Literal["sd", "sdxl"]:
    """``sdxl`` when the pipeline has a second tokenizer and text encoder, ``sd`` with one; else ValueError."""
    has = {name: getattr(pipe, name, None) is not None for name in ("tokenizer", "text_encoder")}
    has_2 = {name: getattr(pipe, name, None) is not None for name in ("tokenizer_2", "text_encoder_2")}
    if all(has_2.values()):
        if not all(has.values()):
            raise ValueError(
                f"{type(pipe).__name__} has tokenizer_2/text_encoder_2 but not both of tokenizer/text_encoder "
                "(an SDXL refiner?); compel weighting needs both SDXL text encoders: use weighting 'none'"
            )
        return "sdxl"
    if all(has.values()):
        return "sd"
    raise ValueError(
        f"{type(pipe).__name__} has no tokenizer/text_encoder pair; compel weighting supports SD-family and "
        "SDXL-family pipelines only: use weighting 'none'"
    )


class PromptEncoder:
    """Turns per-image prompts into keyword arguments for one diffusers pipeline.

    Build it once per pipeline, after the pipeline is on its device (compel places its tensors on the text
    encoder's device at construction), then call it per batch:

        encode = PromptEncoder(pipe, "compel")
        images = pipe(**encode(prompts, negative_prompts), image=..., mask_image=..., ...).images
    """

    def __init__(self, pipe: Any, weighting: Weighting = "none"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"prompt weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.pipe, self.weighting = pipe, weighting
        self.family: str | None = None
        self._compel: Any = None
        if weighting == "compel":
            from compel import CompelForSD, CompelForSDXL

            self.family = pipeline_family(pipe)
            # The CompelFor* wrappers are compel's own set-up for these pipelines: SD uses the last hidden
            # states (normalised); SDXL the penultimate ones of both encoders (not normalised) plus the
            # second encoder's pooled output, i.e. Compel(..., PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            # requires_pooled=[False, True]) without compel's deprecated two-encoder constructor.
            self._compel = (CompelForSDXL if self.family == "sdxl" else CompelForSD)(pipe)

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, Any]:
        """One prompt and one negative prompt per image -> pipeline keyword arguments.

        none:   {"prompt": [str] * B, "negative_prompt": [str] * B}
        compel: {"prompt_embeds": (B, L, D), "negative_prompt_embeds": (B, L, D)} in the text encoder's dtype
                and device, L a multiple of the tokenizer's 77; SDXL adds "pooled_prompt_embeds" and
                "negative_pooled_prompt_embeds" (B, D2).
        """
        prompts, negative_prompts = list(prompts), list(negative_prompts)
        if len(prompts) != len(negative_prompts):
            raise ValueError(
                f"got {len(prompts)} prompts and {len(negative_prompts)} negative prompts; pass one negative "
                "prompt per prompt (an empty string for none)"
            )
        bad = [p for p in prompts + negative_prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        if self._compel is None:
            return {"prompt": prompts, "negative_prompt": negative_prompts}
        if not prompts:
            raise ValueError("compel weighting needs at least one prompt")
        import torch

        with torch.no_grad():
            cond = self._compel(prompts, negative_prompt=negative_prompts)
        out = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": cond.negative_embeds}
        if self.family == "sdxl":
            out["pooled_prompt_embeds"] = cond.pooled_embeds
            out["negative_pooled_prompt_embeds"] = cond.negative_pooled_embeds
        return out


def prompt_kwargs(
    pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str], weighting: Weighting = "none"
) -> dict[str, Any]:
    """One-off form of :class:`PromptEncoder` (builds compel each call; stages keep a PromptEncoder instead)."""
    return PromptEncoder(pipe, weighting)(prompts, negative_prompts)
