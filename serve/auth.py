"""Admin API keys: `Authorization: Bearer <key>`, up to two keys valid at once so keys can rotate.

Keys come from RAYWATCH_ADMIN_KEYS (comma-separated) or the file named by RAYWATCH_ADMIN_KEYS_FILE
(one key per line; re-read on every check, so a rotation needs no restart). Comparison is constant
time. Keys are never logged.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

KEYS_ENV = "RAYWATCH_ADMIN_KEYS"
KEYS_FILE_ENV = "RAYWATCH_ADMIN_KEYS_FILE"
MAX_KEYS = 2


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def admin_keys() -> list[str]:
    path = os.environ.get(KEYS_FILE_ENV)
    if path:
        raw = Path(path).read_text().splitlines() if Path(path).exists() else []
    else:
        raw = os.environ.get(KEYS_ENV, "").split(",")
    keys = [k.strip() for k in raw if k.strip()]
    return keys[:MAX_KEYS]


def check_admin(authorization: str | None) -> None:
    """Raise AuthError(401) without a bearer key, AuthError(403) with a key that matches none."""
    keys = admin_keys()
    if not keys:
        raise AuthError(403, f"admin API disabled: no keys configured ({KEYS_ENV} or {KEYS_FILE_ENV})")
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise AuthError(401, "missing admin key: send 'Authorization: Bearer <key>'")
    given = authorization[7:].strip().encode()
    # compare against every key, whatever matches, so timing reveals nothing
    matched = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matched):
        raise AuthError(403, "admin key not accepted")
