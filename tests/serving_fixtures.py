"""Shared by the test modules: small registered models for the serving tests (one entity, asd/omi-2,
trained in-process) and `wait_for`."""

from __future__ import annotations

import os
import time

from detect.data import Series
from detect.ensemble import EnsembleDetector
from detect.sequence import AutoencoderDetector, LSTMDetector
from train import registry
from train.pipeline import register_fitted


def register_small_models(
    series: Series, versions: int = 1, kinds: tuple[str, ...] = ("autoencoder", "lstm", "ensemble")
) -> None:
    """Register `versions` versions of each detector for one entity; the first becomes champion."""
    train = series.train[series.metrics].to_numpy()[:3000]
    test = series.test[series.metrics].to_numpy()
    half = len(test) // 2
    registry.setup()
    for v in range(versions):
        for kind in kinds:
            if kind == "ensemble":
                det = EnsembleDetector(rf_trees=20, xgb_rounds=20, lgbm_rounds=20, evidence_epochs=1, seed=v).fit(
                    test[:half], series.labels[:half], series.metrics, normal=train
                )
            else:
                cls = AutoencoderDetector if kind == "autoencoder" else LSTMDetector
                det = cls(epochs=1, hidden=16, seed=v).fit(train, series.metrics)
            register_fitted(
                kind,
                {series.name: det},
                {series.name: series.metrics},
                {series.name: test[:half] if kind == "ensemble" else train},
                promote=v == 0,
                run_name=f"test-{kind}-{v}",
            )


def serve_app(name: str, port: int, args: dict):
    """The raywatch app deployed as `name` on 127.0.0.1:`port` with `build_app(args)`, after stopping any
    drift monitor another module left (they are detached); returns an HTTP client to it."""
    import httpx
    from ray import serve

    from monitoring import monitor
    from serve.app import build_app

    monitor.stop_all()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix="/")
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """`predicate()`'s first truthy value, asked every `poll` seconds; AssertionError naming `what`
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back environment variables as `saved` had them (None: it was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
