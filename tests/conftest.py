"""Test-wide settings: no Hub access, deterministic small CPU runs. Shared model/data builders are in
``tests/tiny.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
