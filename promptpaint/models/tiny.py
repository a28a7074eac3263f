"""Pieces shared by the families' tiny random-weight builders: a CLIP-style tokenizer, text-tower sizes, and
the folder marker that lets ``build_tiny`` replace its own folders but never real weights.

Each family builds its own miniature (``Family.build_tiny``); they share a tokenizer so every tiny text tower
reads prompts the way real CLIP does: common words are single tokens, BOS/EOS where CLIP-style models expect.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Written into every build_tiny folder; lets a rebuild replace that folder without clobbering real weights.
TINY_MARKER = "promptpaint_tiny.json"
TINY_TEXT_LEN_SD = 77  # CLIP's real text length (the SD pipeline pads prompts to model_max_length)

# Merges for a few frequent English pieces, so common words become single tokens like in real CLIP.
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "r</w>"),
    ("c", "ar</w>"),
    ("o", "g</w>"),
    ("d", "og</w>"),
    ("i", "n"),
    ("e", "r</w>"),
    ("o", "n</w>"),
    ("a", "n"),
)


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet: the 256 printable stand-ins for bytes 0..255, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = [chr(b) for b in printable]
    chars += [chr(256 + i) for i in range(256 - len(printable))]  # the remaining bytes, remapped
    return chars


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (byte chars, their ``</w>`` forms, merge results, then BOS, then EOS last) and merges.

    BOS must not be id 0: OWL treats a query whose first id is 0 as padding and masks it out.
    EOS must be the highest id: CLIP-style text towers pool at ``input_ids.argmax(-1)``.
    """
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, list(_TINY_MERGES)


def tiny_tokenizer(model_max_length: int) -> Any:
    """CLIP BPE tokenizer over :func:`_tiny_vocab`; pad = EOS as in the real CLIP/SD tokenizers."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_text_config(tok: Any, max_len: int) -> dict[str, Any]:
    """Shared text-tower sizes; vocab and special ids follow the tiny tokenizer."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_len,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def tiny_clip_text(tok: Any, model_cls: str = "CLIPTextModel", **variant: Any) -> Any:
    """Tiny CLIP text tower over ``tok`` (77 tokens); ``variant`` e.g. hidden_act, projection_dim."""
    import transformers

    config = transformers.CLIPTextConfig(**tiny_text_config(tok, TINY_TEXT_LEN_SD), **variant)
    return getattr(transformers, model_cls)(config)


class SaveAs:
    """Gives an object without ``save_pretrained`` build_tiny's contract: ``save(folder)`` writes its files."""

    def __init__(self, save: Callable[[Path], Any]):
        self._save = save

    def save_pretrained(self, folder: str | Path) -> None:
        self._save(Path(folder))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished build into place, refusing to clobber a folder build_tiny did not create."""
    if target.exists():
        if not (target / TINY_MARKER).is_file():
            shutil.rmtree(tmp)
            raise FileExistsError(f"{target} exists and is not a promptpaint tiny model; not overwriting it")
        shutil.rmtree(target)
    tmp.replace(target)
