"""The tiny random-weight model set, under the name the CLI, benchmarks and tests import it by.

The builders live with their families (``promptpaint/models/``); this module only re-exports.
"""

from promptpaint.models.families import build_tiny
from promptpaint.models.owl import TINY_OWL_IMAGE_SIZE, TINY_TEXT_LEN_OWL
from promptpaint.models.tiny import TINY_MARKER, TINY_TEXT_LEN_SD, tiny_text_config, tiny_tokenizer
from promptpaint.models.ultralytics import TINY_ULTRALYTICS_IMGSZ

__all__ = [
    "TINY_MARKER",
    "TINY_OWL_IMAGE_SIZE",
    "TINY_TEXT_LEN_OWL",
    "TINY_TEXT_LEN_SD",
    "TINY_ULTRALYTICS_IMGSZ",
    "build_tiny",
    "tiny_text_config",
    "tiny_tokenizer",
]
