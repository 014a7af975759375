"""Admin API keys and the per-client rate limit.

Admin keys: `Authorization: Bearer <key>`, up to two keys valid at once so keys can rotate.

Keys come from RAYWATCH_ADMIN_KEYS (comma-separated) or the file named by RAYWATCH_ADMIN_KEYS_FILE
(one key per line; re-read on every check, so a rotation needs no restart). Comparison is constant
time. Keys are never logged.

Rate limit on the scoring endpoints: a token bucket per client (`RateLimiter`), from the app argument
`rate_limit={"requests_per_s": R, "burst": B}` or RAYWATCH_RATE_LIMIT_RPS / RAYWATCH_RATE_LIMIT_BURST;
off by default. Past it the API answers 429 with Retry-After.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from pathlib import Path

KEYS_ENV = "RAYWATCH_ADMIN_KEYS"
KEYS_FILE_ENV = "RAYWATCH_ADMIN_KEYS_FILE"
MAX_KEYS = 2
RATE_ENV = "RAYWATCH_RATE_LIMIT_RPS"
BURST_ENV = "RAYWATCH_RATE_LIMIT_BURST"
TRUSTED_PROXIES_ENV = "RAYWATCH_TRUSTED_PROXIES"


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


class RateLimiter:
    """Per-client token bucket: `requests_per_s` sustained, `burst` at once; 0 turns it off.

    Clients are told apart by `client_id` (see `client_id`). Buckets live in the ingress replica
    (each replica counts its own share), at most `max_clients` of them, least recently seen dropped."""

    def __init__(self, requests_per_s: float = 0.0, burst: int | None = None, max_clients: int = 100_000) -> None:
        if requests_per_s < 0 or (burst is not None and burst < 1):
            raise ValueError(f"rate limit: requests_per_s must be >= 0 and burst >= 1, got {requests_per_s}, {burst}")
        self.rate = float(requests_per_s)
        self.burst = float(burst if burst is not None else max(1, round(self.rate)))
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    @classmethod
    def from_config(cls, config: dict | None) -> RateLimiter:
        config = dict(config or {})
        rate = config.get("requests_per_s", os.environ.get(RATE_ENV, 0))
        burst = config.get("burst", os.environ.get(BURST_ENV))
        return cls(float(rate), int(burst) if burst not in (None, "") else None)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, client: str, now: float | None = None) -> float:
        """0.0 when the request may go ahead, else the seconds until the client may retry."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self.buckets) >= self.max_clients:
            self.buckets.popitem(last=False)
        if tokens >= 1.0:
            self.buckets[client] = (tokens - 1.0, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate


def client_id(headers, peer: str | None) -> str:
    """Who a request comes from, for the rate limit: the TCP peer, or, when the peer is one of the
    proxies named in RAYWATCH_TRUSTED_PROXIES (comma-separated addresses), the last hop that proxy
    appended to X-Forwarded-For. Nothing else a client sends is believed (it could name anyone)."""
    peer = peer or "unknown"
    trusted = {p.strip() for p in os.environ.get(TRUSTED_PROXIES_ENV, "").split(",") if p.strip()}
    forwarded = headers.get("x-forwarded-for") if peer in trusted else None
    if forwarded:
        return "ip:" + forwarded.split(",")[-1].strip()
    return "ip:" + peer
