"""Every PDSERVE_* environment variable, typed, in one place."""

from __future__ import annotations

import hashlib
import os


def secret() -> bytes:
    """PDSERVE_SECRET: shared by the router and workers of one deployment; authenticates the KV
    channel (HMAC challenge) and the internal worker API. The launcher generates one per deployment."""
    value = os.environ.get("PDSERVE_SECRET")
    if not value:
        raise RuntimeError("PDSERVE_SECRET is not set: workers and router of a deployment must share it")
    return value.encode()


def internal_token(secret_value: bytes) -> str:
    """What the router sends on the internal worker API: derived from, never equal to, the secret."""
    return hashlib.sha256(b"pdserve-internal-api:" + secret_value).hexdigest()


def log_level() -> str:
    """PDSERVE_LOG_LEVEL: logging level of pdserve processes (default INFO)."""
    return os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper()
