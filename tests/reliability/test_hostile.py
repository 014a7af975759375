"""Hostile input: property-based requests generated from the app's own OpenAPI spec (schemathesis on
hypothesis), oversized bodies (with and without Content-Length), slow bodies, malformed JSON."""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from .support import PORT, SOAK, LoadGenerator, summarize

pytestmark = pytest.mark.slow

GENERATED = int(os.environ.get("RAYWATCH_FUZZ_REQUESTS", 5000 if SOAK else 1000))
FUZZ_BUDGET_S = 600 if SOAK else 200
LIMIT = 4 * 1024 * 1024  # RAYWATCH_MAX_BODY_BYTES default


def test_generated_requests_from_the_openapi_spec_get_no_5xx(served, figures):
    """Every operation of /openapi.json, with valid (positive) and invalid (negative) generated
    parameters and bodies, half of the rounds with a valid admin key: no answer is a 5xx."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
    from schemathesis import GenerationMode

    spec = served.client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    statuses: Counter = Counter()
    per_operation: Counter = Counter()
    server_errors: list[tuple] = []
    not_sent: Counter = Counter()
    session = requests.Session()

    def run(operation, mode, examples: int, headers: dict | None, seed_value: int) -> None:
        try:
            strategy = operation.as_strategy(generation_mode=mode)
        except Exception as exc:  # e.g. nothing negative to generate for an operation without inputs
            not_sent[f"no strategy: {type(exc).__name__}"] += 1
            return

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @seed(seed_value)
        @given(case=strategy)
        def probe(case) -> None:
            try:
                response = case.call(base_url=served.base_url, session=session, headers=headers, timeout=30)
            except (requests.RequestException, ValueError, UnicodeError) as exc:  # not sendable (bad header)
                not_sent[type(exc).__name__] += 1
                return
            statuses[response.status_code] += 1
            per_operation[operation.label] += 1
            if response.status_code >= 500:
                server_errors.append((operation.label, str(case.body)[:200], case.query, response.text[:300]))

        try:
            probe()
        except Exception as exc:  # hypothesis gives up on a space it exhausted: fine, count and go on
            not_sent[f"hypothesis: {type(exc).__name__}"] += 1

    started = time.monotonic()
    round_ = 0
    while sum(statuses.values()) < GENERATED and time.monotonic() - started < FUZZ_BUDGET_S:
        headers = served.admin() if round_ % 2 else None
        for i, operation in enumerate(operations):
            for j, mode in enumerate((GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
                if round_ and sum(statuses.values()) >= GENERATED:
                    break  # every operation had its first round
                run(operation, mode, 30, headers, seed_value=1000 * round_ + 2 * i + j)
        round_ += 1
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    figures["hostile_generated"] = {
        "requests": total,
        "status_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "operations": len(operations),
        "not_sendable": dict(not_sent),
        "seconds": round(elapsed, 1),
    }
    _reset_after_fuzzing(served)
    assert not server_errors, server_errors[:5]
    assert total >= GENERATED, figures["hostile_generated"]
    assert len(per_operation) == len(operations), per_operation
    assert served.all_champion()


def _reset_after_fuzzing(served) -> None:
    """The admin rounds may have moved aliases or traffic: back to champion v1, no challenger."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from train import registry

    client = MlflowClient(registry.tracking_uri())
    for model in ("ensemble", "lstm", "autoencoder"):
        registry.promote(model, "1")
        try:
            client.delete_registered_model_alias(registry.model_name(model), registry.CHALLENGER)
        except MlflowException:
            pass
        body = {"model": model, "challenger_percent": 0, "shadow": False}
        assert served.client.post("/v1/admin/traffic", json=body, headers=served.admin()).status_code == 200


def _raw(head: str, body: bytes = b"", read_timeout: float = 15.0) -> tuple[int, str, float]:
    """Send a request's head (and some body) on a raw socket; return (status, answer, seconds to answer).
    Status 0: the server closed the connection without an answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", PORT), timeout=read_timeout) as sock:
        sock.sendall(head.encode() + body)
        data = _read_response(sock)
    elapsed = time.monotonic() - started
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data.decode(errors="replace"), elapsed
    return int(data[9:12]), data.decode(errors="replace"), elapsed


def _receive(sock: socket.socket, data: bytes, enough: Callable[[bytes], bool]) -> bytes:
    """Append what the server sends to `data` until `enough(data)` (less if it closes or times out)."""
    try:
        while not enough(data):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _read_head(sock: socket.socket) -> bytes:
    """What the server sends up to the end of its response head."""
    return _receive(sock, b"", lambda data: b"\r\n\r\n" in data)


def _read_response(sock: socket.socket) -> bytes:
    """The response head and its Content-Length of body (the body may come in a later segment)."""
    data = _read_head(sock)
    head = data.partition(b"\r\n\r\n")[0]
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    return _receive(sock, data, lambda got: len(got) - len(head) - 4 >= length)


def _head(path: str, headers: dict[str, str]) -> str:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{PORT}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def test_oversized_bodies_are_refused_early_with_413(served, figures):
    """A Content-Length over the limit gets 413 before the body is sent at all; a chunked body (no
    Content-Length) is cut off with 413 once it passes the limit."""
    status, answer, seconds = _raw(_head("/v1/score", {"Content-Length": str(64 * LIMIT)}), b'{"rows": [')
    assert status == 413 and "body" in answer, answer[:300]
    assert seconds < 5, seconds  # answered without waiting for the 256 MiB it announced
    figures["body_limit"] = {"announced_bytes": 64 * LIMIT, "sent_bytes": 10, "status": status, "seconds": seconds}

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", PORT), timeout=30) as sock:
        sock.sendall(_head("/v1/score", {"Transfer-Encoding": "chunked"}).encode())
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent <= 2 * LIMIT:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what a limit should do
        data = _read_head(sock)
    assert data.startswith(b"HTTP/1.1 413"), data[:300]
    figures["body_limit"]["chunked"] = {
        "sent_bytes": sent,
        "status": 413,
        "seconds": round(time.monotonic() - started, 2),
    }
    assert served.client.post("/v1/score", json=served.score_body()).status_code == 200


def test_the_fleet_snapshot_route_has_its_own_limits(served, figures):
    """/v1/score/fleet takes a 10,000-entity scrape: its row and body limits are its own (20,000 rows, 48
    MiB), the other routes keep theirs (5,000 rows, 4 MiB), and past its own it answers 413 / 422 too."""
    from serve.schemas import FLEET_PATH, MAX_FLEET_BODY_BYTES, MAX_FLEET_ROWS, MAX_ROWS

    good = served.row()
    # rows of entities not served: each rejected by index, the one served entity scored
    stranger = {**good, "entity": "fleet/unknown"}
    big = {"rows": [good] + [{**stranger, "entity": f"fleet/m{i}"} for i in range(3 * MAX_ROWS)]}
    body = json.dumps(big).encode()
    assert len(body) > LIMIT, len(body)  # over the other routes' body limit
    started = time.monotonic()
    fleet = served.client.post(FLEET_PATH, content=body, headers={"content-type": "application/json"})
    seconds = round(time.monotonic() - started, 2)
    assert fleet.status_code == 200, fleet.text[:300]
    out = fleet.json()
    assert out["scored"] == 1 and out["results"][0]["index"] == 0
    assert len(out["rejected"]) == 3 * MAX_ROWS and out["rejected"][7]["field"] == "rows[8].entity"
    plain = served.client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert plain.status_code == 413, plain.text[:300]

    too_many = {"rows": [stranger] * (MAX_FLEET_ROWS + 1)}
    answer = served.client.post(FLEET_PATH, json=too_many)
    assert answer.status_code == 422 and answer.json()["detail"].startswith("rows"), answer.text[:300]
    status, detail, _ = _raw(_head(FLEET_PATH, {"Content-Length": str(MAX_FLEET_BODY_BYTES + 1)}), b'{"rows": [')
    assert status == 413 and str(MAX_FLEET_BODY_BYTES) in detail, detail[:300]
    figures["fleet_limits"] = {
        "rows": 3 * MAX_ROWS + 1,
        "body_bytes": len(body),
        "seconds": seconds,
        "score_route_status": plain.status_code,
        "over_rows": answer.status_code,
        "over_body": status,
    }


def test_slow_bodies_are_cut_off_without_harming_others(served, figures):
    """Clients that send part of a body and stall (some also asking Serve, through its per-request
    timeout header, for no timeout) get 408 within the app's body timeout; other clients are served
    as usual meanwhile. Stalled header lines do not hold other clients up either."""
    from .conftest import BODY_TIMEOUT_S

    load = LoadGenerator(served, rate=10, concurrency=8).start()
    stalled = []
    for i in range(8):
        extra = {"x-request-timeout-seconds": "0"} if i % 2 else {}
        sock = socket.create_connection(("127.0.0.1", PORT), timeout=BODY_TIMEOUT_S + 10)
        sock.sendall(_head("/v1/score", {"Content-Length": "4000", **extra}).encode() + b'{"rows": [{"entity": ')
        stalled.append((sock, time.monotonic()))
    headers_only = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", PORT), timeout=5)
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        headers_only.append(sock)
    with ThreadPoolExecutor(len(stalled)) as pool:
        answers = list(pool.map(lambda pair: _answer(*pair), stalled))
    time.sleep(1.0)
    load.stop()
    for sock in headers_only:
        sock.close()
    others = summarize(load.outcomes)
    figures["slow_body"] = {"stalled_clients": len(stalled), "answers": answers, "others": others}
    assert others["errors"] == 0 and others["requests"] >= 20, others
    assert others["p99_ms"] < 2000, others
    for status, seconds in answers:
        assert status == "HTTP/1.1 408", answers
        assert seconds <= BODY_TIMEOUT_S + 5, answers


def _answer(sock: socket.socket, opened: float) -> tuple[str, float]:
    """The status line a stalled client gets, and when; '' if the server closed or said nothing."""
    data = _read_head(sock)
    sock.close()
    return data[:12].decode(errors="replace"), round(time.monotonic() - opened, 1)


MALFORMED = [
    (b'{"rows": [', "truncated"),
    (b"not json at all", "not JSON"),
    (b'{"rows": [{"entity": "\xff\xfe"}]}', "invalid UTF-8"),
    (b"", "empty"),
    (b"null", "null"),
    (b"[]", "an array"),
    (b'"rows"', "a string"),
    (b"\xef\xbb\xbf{}", "a byte-order mark"),
    (b"[" * 50_000 + b"]" * 50_000, "nested 50,000 deep"),
    (b'{"rows": [{"entity": "asd/omi-2", "metrics": {"m00": 1e999}}]}', "a number that overflows"),
    (b'{"rows": [{"entity": "asd/omi-2", "metrics": {"m00": NaN}}]}', "NaN"),
    (b'{"rows": 1, "rows": [], "rows": "x"}', "duplicate keys"),
    (b'{"rows": [' + b'{"entity": "a", "metrics": {"m": 1}},' * 20_000 + b"]}", "20,000 rows, one past the end"),
]


@pytest.mark.parametrize("path", ["/v1/score", "/v1/forecast", "/v1/feedback", "/v1/admin/promote"])
def test_malformed_json_gets_4xx_naming_the_body(served, figures, path):
    headers = {"content-type": "application/json"}
    if path.startswith("/v1/admin"):
        headers.update(served.admin())
    answers = {}
    for body, what in MALFORMED:
        r = served.client.post(path, content=body, headers=headers)
        answers[what] = r.status_code
        assert 400 <= r.status_code < 500, (path, what, r.status_code, r.text[:300])
        detail = r.json().get("detail", "")
        assert isinstance(detail, str) and detail, (path, what, r.text[:300])
    parse_errors = [b'{"rows": [', b"not json at all", b""]
    for body in parse_errors:
        r = served.client.post(path, content=body, headers=headers)
        assert r.json()["detail"].startswith("body"), (path, body, r.json())
    r = served.client.post(path, content=b'{"rows": []}', headers={**headers, "content-type": "text/plain"})
    assert 400 <= r.status_code < 500, r.text
    figures.setdefault("malformed_json", {})[path] = answers
    assert served.client.post("/v1/score", json=served.score_body()).status_code == 200
