"""Shared fixtures: everything runs offline on the CPU with the shipped tiny model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from memtune.cli import quiet_libraries  # noqa: E402

quiet_libraries()
