"""What the shared rate limit costs per request, side by side with the per-replica bucket it replaced.

Three ways to answer "may this client's request go ahead?", timed in one run on a local Ray head
(`cluster.local.LocalHead`, token authentication on), from an asyncio loop as an ingress replica asks:

- `per_replica` (the control): `TokenBuckets.check` in the replica's memory, no Ray call;
- `shared, leased`: `SharedRateLimiter.check` for a client under its limit: local budgets of
  `RateLimit.lease_tokens()` tokens (a tenth of a second's worth) refilled from the `RateLimitBudget`
  actor; at a high limit, and at the README's example of 50 requests/s (a lease of 5 tokens);
- `shared, one call each`: a limit of 5 requests/s (a lease of 1 token), so every allowed request
  costs one actor call: the worst case, and the price of one call.

    python benchmarks/rate_limit.py [--out benchmarks/results] [--requests 20000]

writes <out>/rate_limit.json and <out>/rate_limit.md (microseconds per check, actor calls per 1,000
checks, and the ratio to the control).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.rate_limit import RateLimit, SharedRateLimiter, TokenBuckets  # noqa: E402

CLIENT = "ip:203.0.113.9"


async def time_checks(check, requests: int) -> float:
    """Seconds per `check(CLIENT)` over `requests` calls."""
    started = time.perf_counter()
    for _ in range(requests):
        await check(CLIENT)
    return (time.perf_counter() - started) / requests


async def measure(requests: int) -> list[dict]:
    high = RateLimit(requests_per_s=1_000_000, burst=1_000_000)  # never refuses: every check is an allowed one
    buckets = TokenBuckets(high)

    async def per_replica(client: str) -> float:
        return buckets.check(client)

    rows = [{"path": "per_replica (control)", "limit": high, "s": await time_checks(per_replica, requests), "calls": 0}]
    shared = {
        "shared, leased (high limit)": high,
        "shared, leased (50/s: README's example)": RateLimit(requests_per_s=50, burst=1_000_000),
        "shared, one call each (5/s)": RateLimit(requests_per_s=5, burst=1_000_000),
    }
    for path, limit in shared.items():
        limiter = SharedRateLimiter(limit)
        await limiter.check("warm-up")  # the actor exists before the clock starts
        limiter.actor_calls = 0
        count = requests if limit.lease_tokens() >= 100 else max(200, requests * limit.lease_tokens() // 100)
        rows.append({"path": path, "limit": limit, "s": await time_checks(limiter.check, count), "requests": count})
        rows[-1]["calls"] = limiter.actor_calls
    control = rows[0]["s"]
    return [
        {
            "path": r["path"],
            "lease_tokens": r["limit"].lease_tokens() if r["calls"] else "n/a",
            "checks": r.get("requests", requests),
            "us_per_check": round(r["s"] * 1e6, 2),
            "actor_calls_per_1000": round(1000 * r["calls"] / r.get("requests", requests), 1),
            "x_control": round(r["s"] / control, 1),
        }
        for r in rows
    ]


def markdown(result: dict) -> str:
    cols = list(result["rows"][0])
    lines = [
        f"Rate-limit cost per request, measured on {result['machine']} ({result['date']}), "
        f"`python benchmarks/rate_limit.py`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(row[c]) for c in cols) + " |" for row in result["rows"]),
        "",
        result["setup"],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"  # before ray is imported: the head keeps token authentication on
    import ray

    from cluster.local import LocalHead

    workdir = Path(tempfile.mkdtemp(prefix="raywatch-bench-rate-"))
    head = LocalHead(num_cpus=2, log_path=workdir / "ray-start.log").start()
    try:
        ray.init(address=head.address, log_to_driver=False)
        print(f"timing {args.requests} checks per path", flush=True)
        rows = asyncio.run(measure(args.requests))
    finally:
        ray.shutdown()
        head.stop()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "setup": (
            "One asyncio caller, sequential checks of one client, as an ingress replica makes them; the actor is "
            "the named, detached `RateLimitBudget` on a local head. The lease is a tenth of a second of the "
            "limit (at most a quarter of the burst), so a client near a high limit costs one actor call per "
            "lease, and a client under a low limit one per request (its requests are few by definition)."
        ),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rate_limit.json").write_text(json.dumps(result, indent=2))
    (out / "rate_limit.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
