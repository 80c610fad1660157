"""The embedded demo model: runs anywhere, downloads nothing, and says nothing sensible.

A small Llama-shaped model with seeded random weights and a tokenizer trained
here; built once into the cache folder, then loaded like any local model.
Its output is random text: it exists to show the service working.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from modelserve.models.random_init import build_random_model

DEMO_MODEL_ID = "modelserve-demo"
DEMO_VERSION = 1  # bump when the recipe changes, so old caches are not reused


def demo_model_dir(cache_dir: Path) -> Path:
    """The demo model's directory, built on first use."""
    target = cache_dir / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir))
    try:
        build_random_model(staging, "llama", seed=1234, hidden=128, layers=4, heads=4, tokenizer_vocab=2048)
        try:
            os.replace(staging, target)  # atomic: two servers starting together both end well
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
