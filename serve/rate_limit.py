"""The per-client rate limit of the scoring routes, one limit for the whole app whatever its replica count.

`TokenBuckets` is the limit itself: a token bucket per client, `requests_per_s` sustained and `burst` at
once. One instance lives in a named, detached Ray actor (`RateLimitBudget`), so every ingress replica
draws on the same buckets and N replicas do not allow N times the limit.

Asking the actor on every request would put an actor call on the hot path, so each replica holds a
small local budget per client (`SharedRateLimiter`): it takes a few tokens from the actor at a time
(`lease_tokens`, about a tenth of a second's worth), spends them locally, and gives back what it did not
spend within `lease_s` with its next request. The limit stays exact in total (tokens come only from
the shared buckets) and most requests cost a dict lookup; `benchmarks/rate_limit.py` measures both.
If the actor cannot be reached the replica falls back to a local bucket of the same size (the
per-replica limit) and logs it, so an outage of the actor never turns into an outage of scoring.

Configuration: the app argument `rate_limit={"requests_per_s": R, "burst": B}` (serve/config.yaml) or
RAYWATCH_RATE_LIMIT_RPS / RAYWATCH_RATE_LIMIT_BURST; off by default. Past it the API answers 429 with
Retry-After. Clients are told apart by `client_id`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from detect.actors import named_actor

RATE_ENV = "RAYWATCH_RATE_LIMIT_RPS"
BURST_ENV = "RAYWATCH_RATE_LIMIT_BURST"
TRUSTED_PROXIES_ENV = "RAYWATCH_TRUSTED_PROXIES"
BUDGET_ACTOR = "raywatch-rate-limit"
NAMESPACE = "raywatch"
LEASE_S = 0.1

log = logging.getLogger("raywatch.serve")


@dataclass(frozen=True)
class RateLimit:
    """The configured limit: `requests_per_s` sustained per client, `burst` at once; 0 turns it off."""

    requests_per_s: float = 0.0
    burst: float = 1.0

    @classmethod
    def from_config(cls, config: dict | None) -> RateLimit:
        """From the app argument, else the environment; a bad value raises ValueError naming it."""
        config = dict(config or {})
        unknown = sorted(set(config) - {"requests_per_s", "burst"})
        if unknown:
            raise ValueError(f"rate_limit: unknown key {unknown[0]!r} (known: requests_per_s, burst)")
        rate = float(config.get("requests_per_s", os.environ.get(RATE_ENV) or 0))
        burst = config.get("burst", os.environ.get(BURST_ENV))
        burst = float(burst) if burst not in (None, "") else max(1.0, float(round(rate)))
        if rate < 0 or burst < 1:
            raise ValueError(f"rate_limit: requests_per_s must be >= 0 and burst >= 1, got {rate:g}, {burst:g}")
        return cls(rate, burst)

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0

    def lease_tokens(self) -> int:
        """How many tokens a replica takes from the shared buckets at once: a lease's worth of the rate,
        at most a quarter of the burst (so one replica cannot hold a client's whole burst), at least 1."""
        return max(1, math.floor(min(self.requests_per_s * LEASE_S, self.burst / 4)))

    def describe(self) -> str:
        return f"{self.requests_per_s:g} requests/s per client (burst {self.burst:g})"


class TokenBuckets:
    """A token bucket per client, at most `max_clients` of them (the least recently seen dropped)."""

    def __init__(self, limit: RateLimit, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, want: int = 1, give_back: float = 0.0, now: float | None = None) -> tuple[int, float]:
        """Up to `want` whole tokens for `client`, after adding back `give_back` unspent ones: (granted,
        seconds until one more token is there; 0.0 when some were granted)."""
        if not self.limit.enabled:
            return want, 0.0
        now = time.monotonic() if now is None else now
        rate, burst = self.limit.requests_per_s, self.limit.burst
        tokens, at = self.buckets.pop(client, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate + max(0.0, give_back))
        if len(self.buckets) >= self.max_clients:
            self.buckets.popitem(last=False)
        granted = min(int(tokens), want)
        self.buckets[client] = (tokens - granted, now)
        return granted, 0.0 if granted else (1.0 - tokens) / rate

    def check(self, client: str, now: float | None = None) -> float:
        """0.0 when one request may go ahead, else the seconds until the client may retry."""
        granted, wait = self.take(client, 1, now=now)
        return 0.0 if granted else wait


class RateLimitBudget:
    """The named actor that holds the buckets every ingress replica draws on (`budget_actor`)."""

    def __init__(self) -> None:
        self.buckets = TokenBuckets(RateLimit())

    def take(self, limit: RateLimit, client: str, want: int, give_back: float) -> tuple[int, float]:
        if limit != self.buckets.limit:  # the app was redeployed with another limit: start afresh
            self.buckets = TokenBuckets(limit)
        return self.buckets.take(client, want, give_back)


def budget_actor() -> Any:
    """The shared budget: one named, detached actor per cluster, created by the first replica that asks.
    It holds no secret and nothing that must survive it: restarted empty, every bucket starts full."""
    return named_actor(RateLimitBudget, BUDGET_ACTOR, NAMESPACE)


class SharedRateLimiter:
    """What an ingress replica asks: local budgets per client, refilled from the shared actor."""

    def __init__(self, limit: RateLimit, actor_factory=budget_actor, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.actor_factory = actor_factory
        self.max_clients = max_clients
        # client -> (tokens, until): a lease of `tokens` spendable until then, or, with tokens < 0, a
        # refusal that holds until then (the shared buckets have nothing for the client before it)
        self.leases: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.local = TokenBuckets(limit)  # used only while the shared actor cannot be reached
        self.actor: Any = None
        self.actor_calls = 0

    @property
    def enabled(self) -> bool:
        return self.limit.enabled

    async def check(self, client: str) -> float:
        """0.0 when the request may go ahead, else the seconds until the client may retry."""
        if not self.limit.enabled:
            return 0.0
        now = time.monotonic()
        tokens, until = self.leases.pop(client, (0.0, 0.0))
        if now < until and tokens < 0:
            self._keep(client, tokens, until)
            return until - now
        if now < until and tokens >= 1:
            self._keep(client, tokens - 1, until)
            return 0.0
        try:
            granted, wait = await self._take(client, self.limit.lease_tokens(), max(0.0, tokens))
        except Exception as exc:  # the actor is gone or restarting: this replica's own bucket meanwhile
            log.warning("shared rate limit unavailable, limiting per replica", extra={"error": str(exc)})
            self.actor = None
            return self.local.check(client)
        if not granted:
            self._keep(client, -1.0, now + wait)
            return wait
        self._keep(client, granted - 1, now + LEASE_S)
        return 0.0

    async def _take(self, client: str, want: int, give_back: float) -> tuple[int, float]:
        if self.actor is None:
            self.actor = self.actor_factory()
        self.actor_calls += 1
        return await self.actor.take.remote(self.limit, client, want, give_back)

    def _keep(self, client: str, tokens: float, expires: float) -> None:
        if len(self.leases) >= self.max_clients:
            self.leases.popitem(last=False)
        self.leases[client] = (tokens, expires)


def client_id(headers, peer: str | None, trusted_proxies: str | None = None) -> str:
    """Who a request comes from, for the rate limit: the TCP peer, or, when the peer is one of the
    trusted proxies (comma-separated addresses, RAYWATCH_TRUSTED_PROXIES by default), the last hop that
    proxy appended to X-Forwarded-For. Nothing else a client sends is believed (it could name anyone)."""
    peer = peer or "unknown"
    listed = os.environ.get(TRUSTED_PROXIES_ENV, "") if trusted_proxies is None else trusted_proxies
    trusted = {p.strip() for p in listed.split(",") if p.strip()}
    forwarded = headers.get("x-forwarded-for") if peer in trusted else None
    if forwarded:
        return "ip:" + forwarded.split(",")[-1].strip()
    return "ip:" + peer
