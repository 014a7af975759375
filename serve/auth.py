"""Admin API keys, and whether a feedback label is trusted.

Admin keys: `Authorization: Bearer <key>`, up to two keys valid at once so keys can rotate.

Keys come from RAYWATCH_ADMIN_KEYS (comma-separated) or the file named by RAYWATCH_ADMIN_KEYS_FILE
(one key per line; re-read on every check, so a rotation needs no restart). Comparison is constant
time. Keys are never logged.

The rate limit of the scoring routes is in `serve/rate_limit.py`.
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


def admin_keys(keys_file: str | None = None) -> list[str]:
    """The admin keys, read per call so that a rotated file applies at once: from `keys_file` (the
    ingress's argument), else the file RAYWATCH_ADMIN_KEYS_FILE names, else RAYWATCH_ADMIN_KEYS."""
    path = keys_file or os.environ.get(KEYS_FILE_ENV)
    if path:
        raw = Path(path).read_text().splitlines() if Path(path).exists() else []
    else:
        raw = os.environ.get(KEYS_ENV, "").split(",")
    keys = [k.strip() for k in raw if k.strip()]
    return keys[:MAX_KEYS]


def check_admin(authorization: str | None, keys_file: str | None = None) -> None:
    """Raise AuthError(401) without a bearer key, AuthError(403) with a key that matches none."""
    keys = admin_keys(keys_file)
    if not keys:
        raise AuthError(403, f"admin API disabled: no keys configured ({KEYS_ENV} or {KEYS_FILE_ENV})")
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise AuthError(401, "missing admin key: send 'Authorization: Bearer <key>'")
    given = authorization[7:].strip().encode()
    # compare against every key, whatever matches, so timing reveals nothing
    matched = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matched):
        raise AuthError(403, "admin key not accepted")


def feedback_trusted(authorization: str | None, policy: str, keys_file: str | None = None) -> bool:
    """Whether a feedback label's sender authenticated (an admin key). Without a key, policy "require"
    refuses it (AuthError 401), "untrusted" lets it be stored as untrusted. A wrong key is always refused."""
    if authorization is None:
        if policy == "require":
            raise AuthError(401, "feedback requires an admin key (feedback_auth: require): Authorization: Bearer <key>")
        return False
    check_admin(authorization, keys_file)
    return True
