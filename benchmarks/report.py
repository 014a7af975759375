"""Writes benchmarks/results/README.md from the JSON results: ratios first, each against a control
measured in the same run, then the Done-when checks of the benchmark issue, then links to every table.

    python benchmarks/report.py [--started <unix time of the start of `make bench`>]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_LIMIT_S = 20 * 60
BODY_NAMES = {"matrix": "matrix bodies to /v1/score/batch", "rows": "row objects to /v1/score"}


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return float(f"{a / b:.3g}") if a is not None and b else None


def _find_all(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [row for row in rows if all(row.get(k) == v for k, v in match.items())]


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next(iter(_find_all(rows, **match)), None)


def ort_reference(rows: list[dict[str, Any]], serve_mode: str | None, **match: Any) -> dict[str, Any] | None:
    """The in-process ONNX Runtime point measured beside a Serve mode's run, else the one measured first."""
    point = {"target": "onnxruntime_inprocess", **match}
    return (serve_mode and _find(rows, serve_mode=serve_mode, **point)) or _find(rows, serve_mode=None, **point)


def serving_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Serve mode, detector and point: raywatch against the echo deployment (same mode and
    concurrency), the FastAPI peer (same point) and in-process ONNX Runtime (one thread)."""
    out = []
    for serve in (r for r in rows if r["target"] == "ray_serve"):
        point = {k: serve.get(k) for k in ("detector", "mode", "body", "concurrency")}
        echo = _find(
            rows,
            target="echo",
            serve_mode=serve["serve_mode"],
            mode=serve["mode"],
            body=serve.get("body"),
            concurrency=serve["concurrency"],
        )
        peer = _find(rows, target="fastapi", **point)
        ort = {
            work: ort_reference(rows, serve["serve_mode"], detector=serve["detector"], mode=serve["mode"], work=work)
            for work in ("onnx", "score_rows")
        }
        out.append(
            {
                "serve_mode": serve["serve_mode"],
                **point,
                "rows_per_s": serve["rows_per_s"],
                "p99_ms": serve["p99_ms"],
                "x_echo_rows_per_s": ratio(serve["rows_per_s"], echo and echo["rows_per_s"]),
                "x_echo_p99": ratio(serve["p99_ms"], echo and echo["p99_ms"]),
                "x_fastapi_rows_per_s": ratio(serve["rows_per_s"], peer and peer["rows_per_s"]),
                "x_fastapi_p99": ratio(serve["p99_ms"], peer and peer["p99_ms"]),
                "x_ort_onnx_rows_per_s": ratio(serve["rows_per_s"], ort["onnx"] and ort["onnx"]["rows_per_s"]),
                "x_ort_score_rows_rows_per_s": ratio(
                    serve["rows_per_s"], ort["score_rows"] and ort["score_rows"]["rows_per_s"]
                ),
            }
        )
    return out


def _round_median(rounds: list[dict[str, dict[str, Any]]], target: str, key: str) -> float:
    return statistics.median(r[target][key] for r in rounds)


def paired_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Serve mode, issue 20's single-row line from paired rounds (`serving.paired_rounds`): raywatch's
    requests/s over the FastAPI peer's and its p99 over the echo deployment's, each taken within a round,
    as the median over the rounds and their range."""
    out = []
    for mode in sorted({row["serve_mode"] for row in rows}):
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for row in _find_all(rows, serve_mode=mode):
            by_round.setdefault(row["paired_round"], {})[row["target"]] = row
        complete = [r for r in by_round.values() if {"ray_serve", "fastapi", "echo"} <= set(r)]
        if not complete:
            continue
        x_peer = [r["ray_serve"]["requests_per_s"] / r["fastapi"]["requests_per_s"] for r in complete]
        x_echo = [r["ray_serve"]["p99_ms"] / r["echo"]["p99_ms"] for r in complete]
        median = functools.partial(_round_median, complete)
        out.append(
            {
                "serve_mode": mode,
                "rounds": len(complete),
                "raywatch_req_s": median("ray_serve", "requests_per_s"),
                "fastapi_req_s": median("fastapi", "requests_per_s"),
                "x_fastapi_median": ratio(statistics.median(x_peer), 1),
                "x_fastapi_range": f"{min(x_peer):.2f}-{max(x_peer):.2f}",
                "raywatch_p99_ms": median("ray_serve", "p99_ms"),
                "echo_p99_ms": median("echo", "p99_ms"),
                "fastapi_p99_ms": median("fastapi", "p99_ms"),
                "x_echo_p99_median": ratio(statistics.median(x_echo), 1),
                "x_echo_p99_range": f"{min(x_echo):.2f}-{max(x_echo):.2f}",
            }
        )
    return out


def where(result: dict[str, Any]) -> str:
    """Machine, date and the load other jobs put on it, as each result file records them."""
    load = result.get("load_average")
    return f"{result['machine']}, {result['date']}" + (
        f", load average (1/5/15 min) {load['start']} at the start, {load['end']} at the end" if load else ""
    )


def time_split(rows: list[dict[str, Any]], detector: str = "ensemble") -> list[dict[str, Any]]:
    """Where a single-row request's time goes (1 client, p50 ms), from points measured in the run: the
    model work alone, the same work behind one FastAPI process, Serve's own path (echo), raywatch."""
    work = _find(rows, target="onnxruntime_inprocess", detector=detector, mode="single", work="score_rows")
    peer = _find(rows, target="fastapi", detector=detector, mode="single", concurrency=1)
    out = []
    for mode in ("default", "high_throughput"):
        serve = _find(rows, target="ray_serve", serve_mode=mode, detector=detector, mode="single", concurrency=1)
        echo = _find(rows, target="echo", serve_mode=mode, mode="single", concurrency=1)
        if not (serve and echo and work and peer):
            continue
        out.append(
            {
                "serve_mode": mode,
                "model work in process": work["p50_ms"],
                "FastAPI peer": peer["p50_ms"],
                "echo (Serve's path)": echo["p50_ms"],
                "raywatch": serve["p50_ms"],
                "raywatch - echo": round(serve["p50_ms"] - echo["p50_ms"], 2),
                "raywatch - echo - model work": round(serve["p50_ms"] - echo["p50_ms"] - work["p50_ms"], 2),
            }
        )
    return out


def batch_split(rows: list[dict[str, Any]], detector: str = "ensemble") -> list[dict[str, Any]]:
    """1,000-row batches, rows/s, from the compute limit outwards: the ONNX graphs alone, a replica's
    whole model work, one FastAPI process doing all of it, Serve's own path for the same body (echo),
    raywatch; each Serve row at the same concurrency."""
    work = _find(rows, target="onnxruntime_inprocess", detector=detector, mode="batch", work="score_rows")
    out = []
    for serve in (r for r in rows if r["target"] == "ray_serve" and r["mode"] == "batch" and r["detector"] == detector):
        onnx = ort_reference(rows, serve["serve_mode"], detector=detector, mode="batch", work="onnx")
        c, body = serve["concurrency"], serve.get("body")
        peer = _find(rows, target="fastapi", detector=detector, mode="batch", body=body, concurrency=c)
        echo = _find(rows, target="echo", serve_mode=serve["serve_mode"], mode="batch", body=body, concurrency=c)
        out.append(
            {
                "serve_mode": serve["serve_mode"],
                "body": body,
                "concurrency": c,
                "ONNX alone (1 thread)": onnx and onnx["rows_per_s"],
                "model work in process": work and work["rows_per_s"],
                "FastAPI peer": peer and peer["rows_per_s"],
                "echo (Serve's path)": echo and echo["rows_per_s"],
                "raywatch": serve["rows_per_s"],
                "raywatch / ONNX alone": ratio(serve["rows_per_s"], onnx and onnx["rows_per_s"]),
            }
        )
    return out


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _check(label: str, passed: bool | None, figures: str) -> dict[str, Any]:
    return {
        "criterion": label,
        "result": "n/a" if passed is None else ("pass" if passed else "FAIL"),
        "figures": figures,
    }


def checks(
    serving: dict | None,
    batching: dict | None,
    tune: dict | None,
    wall_s: float | None,
    paired: dict | None = None,
) -> list[dict[str, Any]]:
    out = []
    if wall_s is not None:
        out.append(_check("`make bench` in at most 20 minutes", wall_s <= BENCH_LIMIT_S, f"{wall_s / 60:.1f} min"))
    if serving:
        rows = serving["rows"]
        serve = _find(
            rows, target="ray_serve", serve_mode="high_throughput", detector="ensemble", mode="single", concurrency=8
        )
        peer = _find(rows, target="fastapi", detector="ensemble", mode="single", concurrency=8)
        echo = _find(rows, target="echo", serve_mode="high_throughput", mode="single", concurrency=8)
        if serve and peer:
            out.append(
                _check(
                    "high-throughput, ensemble, single rows, 8 clients: requests/s >= FastAPI peer",
                    serve["requests_per_s"] >= peer["requests_per_s"],
                    f"{serve['requests_per_s']:,.0f} vs {peer['requests_per_s']:,.0f} req/s "
                    f"({ratio(serve['requests_per_s'], peer['requests_per_s'])}x)",
                )
            )
        if serve and echo:
            out.append(
                _check(
                    "same point: p99 <= 2x the echo deployment's p99 (same mode)",
                    serve["p99_ms"] <= 2 * echo["p99_ms"],
                    f"{serve['p99_ms']} vs {echo['p99_ms']} ms ({ratio(serve['p99_ms'], echo['p99_ms'])}x)",
                )
            )
        batch = _find_all(rows, target="ray_serve", serve_mode="high_throughput", detector="ensemble", mode="batch")
        ort = ort_reference(rows, "high_throughput", detector="ensemble", mode="batch", work="onnx")
        if batch and ort:
            for body in sorted({r.get("body") for r in batch}, key=str):
                best = max((r for r in batch if r.get("body") == body), key=lambda r: r["rows_per_s"])
                out.append(
                    _check(
                        f"1,000-row batches ({BODY_NAMES.get(body, body)}), ensemble (high-throughput, best "
                        "concurrency): >= 50% of in-process ONNX Runtime rows/s",
                        best["rows_per_s"] >= 0.5 * ort["rows_per_s"],
                        f"{best['rows_per_s']:,.0f} rows/s at {best['concurrency']} clients vs "
                        f"{ort['rows_per_s']:,.0f} ({100 * best['rows_per_s'] / ort['rows_per_s']:.1f}%)",
                    )
                )
    out += paired_checks(paired)
    if batching:
        for name, row in batching.get("handle", {}).items():
            x = ratio(row["batched_rows_per_s"], row["unbatched_rows_per_s"])
            out.append(
                _check(
                    f"handle path, {name}, 32 callers: batching >= 3x max_batch_size=1",
                    x is not None and x >= 3,
                    f"{row['batched_rows_per_s']:,.0f} vs {row['unbatched_rows_per_s']:,.0f} rows/s ({x}x)",
                )
            )
    if tune:
        out.append(
            _check(
                "ASHA: same or better best score with at most half the trial-epochs",
                tune["asha_best"] <= tune["full_best"] and tune["asha_trial_epochs"] <= 0.5 * tune["full_trial_epochs"],
                f"best val_loss {tune['asha_best']:.5g} vs {tune['full_best']:.5g}; trial-epochs "
                f"{tune['asha_trial_epochs']} vs {tune['full_trial_epochs']}",
            )
        )
    return out


def paired_checks(paired: dict | None) -> list[dict[str, Any]]:
    """Issue 20's single-row lines read from the paired rounds (high-throughput mode): the medians of the
    rounds' ratios to the FastAPI peer's requests/s and to the echo deployment's p99."""
    out = []
    for summary in paired_summary(paired["rows"]) if paired else []:
        if summary["serve_mode"] != "high_throughput":
            continue
        rounds = f"median of {summary['rounds']} paired rounds"
        out.append(
            _check(
                "issue 20: same point in paired rounds: requests/s >= 0.8x the FastAPI peer",
                summary["x_fastapi_median"] >= 0.8,
                f"{summary['raywatch_req_s']:,.0f} vs {summary['fastapi_req_s']:,.0f} req/s; {rounds}: "
                f"{summary['x_fastapi_median']}x (range {summary['x_fastapi_range']})",
            )
        )
        out.append(
            _check(
                "issue 20: same point in paired rounds: p99 <= 2x the echo deployment's",
                summary["x_echo_p99_median"] <= 2,
                f"{summary['raywatch_p99_ms']} vs {summary['echo_p99_ms']} ms; {rounds}: "
                f"{summary['x_echo_p99_median']}x (range {summary['x_echo_p99_range']})",
            )
        )
    return out


def write_readme(started: float | None = None) -> Path:
    serving, batching = _load("serving.json"), _load("batching.json")
    training, tune = _load("training.json"), _load("tune.json")
    wall_s = time.time() - started if started else None
    md = [
        "# Benchmarks",
        "",
        "`make bench` runs every benchmark below and writes this page from the JSON beside it. Each figure is",
        "a ratio against a control measured in the same run on the same machine, because the machine is shared",
        "and absolute numbers are noisy.",
        "",
    ]
    if wall_s is not None:
        md += [f"`make bench` wall time: {wall_s / 60:.1f} min ({time.strftime('%Y-%m-%d %H:%M')}).", ""]
    paired = _load("serving_paired.json")
    md += ["## Done-when checks", "", table(checks(serving, batching, tune, wall_s, paired)), ""]
    if serving:
        md += [
            "## Serving: Ray Serve against its own ceiling, the compute limit and the usual alternative",
            "",
            f"{where(serving)}; entity {serving['entity']}; {serving['load_generator']}. "
            "`x_echo`: raywatch / the echo deployment (same Serve mode, same concurrency); `x_fastapi`: raywatch / "
            "one FastAPI + uvicorn process serving the same model; `x_ort_onnx`: raywatch rows/s / the ONNX graphs "
            "alone in process on one thread; `x_ort_score_rows`: / a replica's whole model work in process. "
            "Full table: [serving.md](serving.md).",
            "",
            table(serving_ratios(serving["rows"])),
            "",
            "Where the time of one single-row ensemble request goes (1 client, p50 ms); the last column is what",
            "raywatch adds beyond Serve's own HTTP path and the model work: the ingress's own work, the",
            "deployment-handle hop to the detector replica and the `@serve.batch` wait.",
            "",
            table(time_split(serving["rows"])),
            "",
            "1,000-row ensemble batches, rows/s, from the compute limit outwards:",
            "",
            table(batch_split(serving["rows"])),
            "",
        ]
    if batching:
        md += [
            "## Dynamic batching (`@serve.batch` against `max_batch_size=1`)",
            "",
            f"{where(batching)}. {batching['setup']} Full table: [batching.md](batching.md).",
            "",
            *(
                [
                    f"Handle echo (a deployment whose `score` returns at once, same callers): "
                    f"{fmt(batching['handle_echo']['rows_per_s'])} calls/s at 32 callers, "
                    f"p50 {batching['handle_echo']['1_caller_p50_ms']} ms for one caller alone: the most any "
                    "detector can serve here with one handle call per row, batched or not.",
                    "",
                ]
                if batching.get("handle_echo")
                else []
            ),
            table(
                [
                    {
                        "path": "handle",
                        "detector": name,
                        **row,
                        "x": ratio(row["batched_rows_per_s"], row["unbatched_rows_per_s"]),
                    }
                    for name, row in batching["handle"].items()
                ]
                + [
                    {
                        "path": "http",
                        "detector": name,
                        **row,
                        "x": ratio(row["batched_rows_per_s"], row["unbatched_rows_per_s"]),
                    }
                    for name, row in batching.get("http", {}).items()
                ],
                [
                    "path",
                    "detector",
                    "batched_rows_per_s",
                    "unbatched_rows_per_s",
                    "x",
                    "handle_echo_rows_per_s",
                    "batched_replica_cpu_ms_per_row",
                    "unbatched_replica_cpu_ms_per_row",
                    "batched_1_caller_p50_ms",
                    "unbatched_1_caller_p50_ms",
                ],
            ),
            "",
        ]
    if training:
        rows = []
        for model in sorted({r["model"] for r in training["rows"]}):
            one = _find(training["rows"], model=model, workers=1, device="cpu")
            two = _find(training["rows"], model=model, workers=2, device="cpu")
            rows.append(
                {
                    "model": model,
                    "1 worker rows/s": one and one["rows_per_s"],
                    "2 workers rows/s": two and two["rows_per_s"],
                    "x (2 / 1)": ratio(two and two["rows_per_s"], one and one["rows_per_s"]),
                }
            )
        md += [
            "## Training (Ray Train `TorchTrainer`, CPU)",
            "",
            f"{where(training)}. {training['setup']} GPU: {training['gpu']}. Full table: [training.md](training.md).",
            "",
            table(rows),
            "",
        ]
    if tune:
        md += [
            "## Tuning: ASHA against no early stopping",
            "",
            f"{where(tune)}. {tune['setup']} Full table: [tune.md](tune.md).",
            "",
            table(
                [
                    {
                        "scheduler": "ASHA",
                        "best val_loss": tune["asha_best"],
                        "trial-epochs": tune["asha_trial_epochs"],
                    },
                    {
                        "scheduler": "none (FIFO)",
                        "best val_loss": tune["full_best"],
                        "trial-epochs": tune["full_trial_epochs"],
                    },
                    {
                        "scheduler": "ASHA / none",
                        "best val_loss": ratio(tune["asha_best"], tune["full_best"]),
                        "trial-epochs": ratio(tune["asha_trial_epochs"], tune["full_trial_epochs"]),
                    },
                ]
            ),
            "",
        ]
    md += ["## Other tables", ""]
    for name, what in (
        (
            "compression.md",
            "compression: ONNX FP32, INT8 and distilled students side by side (`make bench-compression`)",
        ),
        ("drift.md", "drift tests: false-drift rate and detection delay (`make bench-drift`)"),
        ("drift_loop.md", "the self-retraining loop, timed (`make bench-drift`)"),
    ):
        if (RESULTS / name).exists():
            first = (RESULTS / name).read_text().splitlines()[0]
            md.append(f"- [{name}]({name}): {what}. {first}")
    path = RESULTS / "README.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--started", type=float, help="unix time `make bench` started, for its wall time")
    args = parser.parse_args(argv)
    path = write_readme(args.started)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
