"""DreamBooth-LoRA fine-tuning on Ray Train (``promptpaint train``): see ``job.py`` for the run, ``loop.py`` for
the per-worker loop, ``model.py`` for the LoRA model and loss, ``data.py`` and ``class_images.py`` for the data."""
