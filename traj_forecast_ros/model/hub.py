"""Hugging Face hub settings shared by the encoders (error messages) and the registry (downloads)."""

from __future__ import annotations

import os

OFFLINE_ENV = "HF_HUB_OFFLINE"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for offline mode (1/true/yes/on), read at every call."""
    return os.environ.get(OFFLINE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
