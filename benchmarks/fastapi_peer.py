"""The serving benchmark's peer: one plain FastAPI + uvicorn process (no Ray) serving the registered
champion versions with raywatch's `/v1/score` contract: what a user would pick instead of Ray Serve.

    MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/bench-serve/mlflow.db python benchmarks/fastapi_peer.py --port 8160

It does the work the Serve app does per request, in one process, the same way: the body parsed and
validated in one pass with the same pydantic schema (serve/schemas.py), the same per-entity history
of raw samples (serve.history.HISTORY_ROWS) of which only the context rows the models read are copied,
the same scoring code (`EntityModel.score_arrays`: features or windows, ONNX Runtime on one thread,
top metrics), the response serialised without a second validation pass; `/v1/score/batch` (one entity's
rows as a matrix) with the same schema and response code (serve/schemas.py) as the Serve app. It has no A/B routing, circuit
breaker, rate limit, Prometheus metrics or drift-monitor feed.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from itertools import islice
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import to_json

from serve import schemas as S
from serve.detectors import EntityModel, load_models, load_slot
from serve.history import HISTORY_ROWS


def create_app(detectors: tuple[str, ...] = S.DETECTORS) -> FastAPI:
    refs: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, EntityModel]] = {}
    for name in detectors:
        slot = load_slot(name, "champion")
        if slot is not None:
            refs[name], models[name] = slot.ref, load_models(name)
    if not models:
        raise SystemExit(f"no champion registered for {list(detectors)}: train first")
    known: dict[str, list[str]] = {}
    for by_entity in models.values():
        for entity, model in by_entity.items():
            known.setdefault(entity, model.metrics)
    history: dict[str, deque] = {}
    app = FastAPI(title="raywatch FastAPI peer")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "detectors": refs}

    def score_new(entity: str, new: np.ndarray, names: list[str]) -> dict[str, tuple[str, dict, dict]]:
        """One entity's new rows after its history, by each detector: (path, model ref, arrays)."""
        hist = history.setdefault(entity, deque(maxlen=HISTORY_ROWS))
        context = max(models[name][entity].context_rows for name in names)
        prior = list(islice(hist, max(0, len(hist) - context), None))
        rows = np.concatenate([np.asarray(prior, dtype=np.float64), new]) if prior else new
        hist.extend(new)
        out = {}
        for name in names:
            model = models[name][entity]
            arrays = model.score_arrays([(rows[-(len(new) + model.context_rows) :], len(new))])[0]
            out[name] = ("champion", refs[name], arrays)
        return out

    def parse(model: type[S.BaseModel], body: bytes) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None

    def served(requested: list[str] | None) -> list[str]:
        names = list(dict.fromkeys(requested or S.DETECTORS))
        missing = [n for n in names if n not in models]
        if missing:
            raise HTTPException(503, f"detectors: no model is loaded for {missing}")
        return names

    @app.post("/v1/score/batch", response_model=S.ScoreBatchResponse)
    async def score_batch(raw: Request) -> Response:
        request = parse(S.ScoreBatchRequest, await raw.body())
        names = served(request.detectors)
        metrics = known.get(request.entity)
        if metrics is None:
            raise HTTPException(422, f"entity: unknown entity {request.entity!r}")
        try:
            new = S.batch_values(request, metrics)
        except S.FieldError as exc:
            raise HTTPException(422, str(exc)) from None
        out = S.batch_result(request.entity, request.timestamps, score_new(request.entity, new, names))
        return Response(content=to_json(out), media_type="application/json")

    @app.post("/v1/score", response_model=S.ScoreResponse)
    async def score(raw: Request) -> Response:
        request = parse(S.ScoreRequest, await raw.body())
        names = served(request.detectors)
        by_entity: dict[str, list[int]] = {}
        for i, row in enumerate(request.rows):
            metrics = known.get(row.entity)
            if metrics is None:
                raise HTTPException(422, f"rows[{i}].entity: unknown entity {row.entity!r}")
            if set(row.metrics) != set(metrics):
                raise HTTPException(422, f"rows[{i}].metrics: metrics differ from the model's")
            by_entity.setdefault(row.entity, []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(request.rows)
        for entity, idx in by_entity.items():
            metrics = known[entity]
            new = np.array([[request.rows[i].metrics[m] for m in metrics] for i in idx], dtype=np.float64)
            for name, (path, model, arrays) in score_new(entity, new, names).items():
                for k, scored in enumerate(S.result_rows(arrays)):
                    i = idx[k]
                    row = results[i] or {"entity": entity, "timestamp": request.rows[i].timestamp, "detectors": {}}
                    row["detectors"][name] = {**scored, "model": model, "path": path}
                    results[i] = row
        for row in results:
            row["is_anomaly"] = any(d["is_anomaly"] for d in row["detectors"].values())
            probs = [p for d in row["detectors"].values() if (p := d.get("incident_probability")) is not None]
            row["incident_probability"] = probs[0] if probs else None
        return Response(content=to_json({"results": results}), media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8160)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
