"""Configuration: one typed model, loaded from TOML, environment and flags."""

from __future__ import annotations

from wsguard.config.loader import load_config, validate_config
from wsguard.config.model import Config

__all__ = ["Config", "load_config", "validate_config"]
