"""Prompt weighting (compel) on the tiny SD1.5 / SDXL inpaint pipelines, loaded through the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from promptpaint.models import MODELS, load_model
from promptpaint.prompting import PromptEncoder, pipeline_family, prompt_kwargs

CPU = torch.device("cpu")
PROMPTS = ["a red bicycle", "the dog on a mat"]
NEGATIVES = ["blurry, low quality", ""]


def pipe_of(tiny_models: Path, name: str) -> Any:
    return load_model(name, str(tiny_models), CPU, torch.float32, task="inpaint").model


@pytest.fixture(scope="module")
def sd(tiny_models: Path) -> Any:
    return pipe_of(tiny_models, "sd15-inpaint")


def inpaint(pipe: Any, kwargs: dict[str, Any], n: int) -> np.ndarray:
    """One denoising step at 64 px on a fixed image and mask -> (n, 64, 64, 3) float32."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return pipe(
        **kwargs,
        image=[image] * n,
        mask_image=[Image.fromarray(mask)] * n,
        height=64,
        width=64,
        num_inference_steps=1,
        guidance_scale=7.5,
        strength=1.0,  # SDXL inpaint defaults to 0.9999, which leaves 0 of 1 steps
        generator=[torch.Generator("cpu").manual_seed(k) for k in range(n)],
        output_type="np",
    ).images


def test_none_weighting_passes_strings_and_checks_inputs(sd: Any) -> None:
    assert prompt_kwargs(sd, PROMPTS, NEGATIVES) == {"prompt": PROMPTS, "negative_prompt": NEGATIVES}
    assert PromptEncoder(sd, "none")(tuple(PROMPTS), tuple(NEGATIVES))["prompt"] == PROMPTS
    with pytest.raises(ValueError, match="one of \\['none', 'compel'\\]"):
        PromptEncoder(sd, "weighted")
    with pytest.raises(ValueError, match="2 prompts and 1 negative prompts"):
        PromptEncoder(sd, "compel")(PROMPTS, NEGATIVES[:1])
    with pytest.raises(ValueError, match="prompts must be strings"):
        PromptEncoder(sd, "none")(["a cat", None], ["", ""])
    with pytest.raises(ValueError, match="no tokenizer/text_encoder pair"):
        pipeline_family(object())


def test_compel_unweighted_equals_pipeline_encode_prompt(sd: Any) -> None:
    kw = PromptEncoder(sd, "compel")(PROMPTS, NEGATIVES)
    assert set(kw) == {"prompt_embeds", "negative_prompt_embeds"}
    embeds, negative = sd.encode_prompt(PROMPTS, CPU, 1, True, negative_prompt=NEGATIVES)
    assert kw["prompt_embeds"].shape == embeds.shape == (2, 77, 32)
    torch.testing.assert_close(kw["prompt_embeds"], embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kw["negative_prompt_embeds"], negative, atol=1e-5, rtol=1e-5)


def test_compel_syntax_changes_the_embeddings(sd: Any) -> None:
    encode = PromptEncoder(sd, "compel")
    plain = encode(PROMPTS, NEGATIVES)["prompt_embeds"]
    up = encode(["a (red)1.5 bicycle", PROMPTS[1]], NEGATIVES)["prompt_embeds"]
    assert (up[0] - plain[0]).abs().max() > 0.1  # the weight moved the embedding
    torch.testing.assert_close(up[1], plain[1], atol=0, rtol=0)  # the other row is untouched
    # `++` is two steps of x1.1: the same as an explicit 1.21
    plus = encode(["a (red)++ bicycle"], [""])["prompt_embeds"]
    explicit = encode(["a (red)1.21 bicycle"], [""])["prompt_embeds"]
    torch.testing.assert_close(plus, explicit, atol=1e-5, rtol=1e-5)
    assert (plus[0] - plain[0]).abs().max() > 0.01
    # blend with all weight on the first prompt = that prompt
    blend = encode(['("a red bicycle", "the dog on a mat").blend(1, 0)'], [""])["prompt_embeds"]
    torch.testing.assert_close(blend[0], plain[0], atol=1e-5, rtol=1e-5)
    # .and() encodes the parts separately and concatenates: 2 x 77 tokens, negatives padded to match
    joined = encode(['("a red bicycle", "on a beach").and()', PROMPTS[1]], NEGATIVES)
    assert joined["prompt_embeds"].shape == joined["negative_prompt_embeds"].shape == (2, 154, 32)


def test_compel_kwargs_run_through_the_pipeline(sd: Any) -> None:
    encode = PromptEncoder(sd, "compel")
    weighted = ["a (red)1.5 bicycle", PROMPTS[1]]  # row 1 has no weights
    first = inpaint(sd, encode(weighted, NEGATIVES), 2)
    assert first.shape == (2, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, inpaint(sd, encode(weighted, NEGATIVES), 2))  # deterministic
    as_strings = inpaint(sd, PromptEncoder(sd, "none")(PROMPTS, NEGATIVES), 2)
    np.testing.assert_allclose(first[1], as_strings[1], atol=1e-5)  # no weights: today's behaviour
    assert np.abs(first[0] - as_strings[0]).max() > 1e-4  # the weight reached the image


@pytest.mark.skipif("sdxl-inpaint" not in MODELS, reason="no tiny SDXL inpaint entry in the registry")
def test_compel_sdxl_pooled_embeddings(tiny_models: Path) -> None:
    pipe = pipe_of(tiny_models, "sdxl-inpaint")
    encode = PromptEncoder(pipe, "compel")
    assert encode.family == "sdxl"
    kw = encode(PROMPTS, NEGATIVES)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    assert list(kw) == names
    # encode_prompt returns the same four tensors in this order
    ref = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
    for name, want in zip(names, ref, strict=True):
        torch.testing.assert_close(kw[name], want, atol=1e-5, rtol=1e-5, msg=name)
    weighted = ["a (red)1.5 bicycle", PROMPTS[1]]
    up = encode(weighted, NEGATIVES)
    assert (up["prompt_embeds"][0] - kw["prompt_embeds"][0]).abs().max() > 0.1
    out = inpaint(pipe, up, 2)
    np.testing.assert_array_equal(out, inpaint(pipe, encode(weighted, NEGATIVES), 2))
    as_strings = inpaint(pipe, PromptEncoder(pipe, "none")(PROMPTS, NEGATIVES), 2)
    np.testing.assert_allclose(out[1], as_strings[1], atol=1e-5)
    assert np.abs(out[0] - as_strings[0]).max() > 1e-4
