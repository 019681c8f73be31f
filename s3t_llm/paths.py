"""Where things live: the shared data folder, the model cache, runs.

Every location can be overridden by an environment variable so that tests and users on other
machines can point the toolkit at their own copies.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The shared data folder (Alpaca and the zero-shot benchmark files).

    ``S3T_SHARED_DATA`` wins; otherwise ``../shared/data`` beside the checkout.
    """
    env = os.environ.get("S3T_SHARED_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


def alpaca_path() -> Path:
    return shared_data_dir() / "alpaca" / "alpaca_en_52k_open-chinese.json"


def cache_dir() -> Path:
    """Converted models and other reusable artifacts (``S3T_CACHE``, default ``~/.cache/s3t_llm``)."""
    env = os.environ.get("S3T_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "s3t_llm"
