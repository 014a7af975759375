"""Alerts from the live scores: Alertmanager's API (`POST /api/v2/alerts`) and generic webhooks.

`Notifier.observe` takes every scored row of an (entity, detector) in time order, with whether it is
anomalous: the watcher passes whether the detector's served alert on the entity is open after the row
(`ingest.watch.alert_open`: the Serve app groups rows into alert episodes, so one spike is not an
alert). An alert fires when that has held for `for` (the rows' own timestamps, so a watcher catching
up after a restart decides exactly as a live one), and resolves when it has been quiet for
`resolve_after`. One alert per label set (alertname, entity, detector + the configured labels):

- Alertmanager: a firing alert is posted once and re-sent every `resend` with `endsAt` a few resends
  ahead (if raywatch stops, Alertmanager resolves it by itself); when the anomaly ends it is posted
  with `endsAt` = the first quiet row's time, which resolves it. A post that fails is retried on the
  next flush; nothing is sent twice for the same change.
- Webhooks (chat tools): one JSON POST per change (firing, resolved), never repeated: a Slack-style
  `text` line plus Alertmanager-style `status` and `alerts`.

The state (firing or not, since when) can be persisted through a store (the watcher's SQLite file), so
a restarted watcher neither re-announces nor forgets an alert.

    alerts:
      alertmanager: http://127.0.0.1:9093
      webhooks: [https://hooks.slack.com/services/...]
      for: 1m              # flagged this long before the alert fires
      resolve_after: 1m    # quiet this long before it resolves
      resend: 1m
      labels: {severity: warning, team: infra}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from detect.kinds import KIND_TRAITS, traits_of
from ingest.prometheus import SourceError, parse_duration

log = logging.getLogger("raywatch.alerts")

PROBABILITY_ALERT = "RaywatchIncidentLikely"  # from a detector whose score is an incident probability
DEFAULT_ALERT = "RaywatchAnomaly"  # from the anomaly scorers


def alert_name(detector: str) -> str:
    return PROBABILITY_ALERT if detector in KIND_TRAITS and traits_of(detector).probability else DEFAULT_ALERT


def iso(ts: float) -> str:
    """RFC 3339 with milliseconds, UTC (what Alertmanager expects)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AlertSettings:
    """The `alerts:` section of a source config (also the `raywatch watch` flags)."""

    alertmanager: str | None = None
    webhooks: list[str] = field(default_factory=list)
    for_s: float = 60.0
    resolve_after_s: float = 60.0
    resend_s: float = 60.0
    labels: dict[str, str] = field(default_factory=lambda: {"severity": "warning"})
    timeout_s: float = 5.0
    generator_url: str | None = None  # a link shown by Alertmanager (e.g. the Grafana dashboard)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, origin: str = "<source>") -> AlertSettings:
        data = dict(data or {})
        known = {
            "alertmanager",
            "webhooks",
            "for",
            "resolve_after",
            "resend",
            "labels",
            "timeout",
            "generator_url",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise SourceError(f"{origin}: alerts.{unknown[0]}: unknown field; known fields are {sorted(known)}")
        am = data.get("alertmanager")
        if am is not None and (not isinstance(am, str) or not am.startswith(("http://", "https://"))):
            raise SourceError(f"{origin}: alerts.alertmanager: expected a URL like http://127.0.0.1:9093, got {am!r}")
        hooks = data.get("webhooks") or []
        if isinstance(hooks, str):
            hooks = [hooks]
        if not isinstance(hooks, list) or not all(
            isinstance(h, str) and h.startswith(("http://", "https://")) for h in hooks
        ):
            raise SourceError(f"{origin}: alerts.webhooks: expected a list of http(s) URLs, got {hooks!r}")
        labels = data.get("labels", {"severity": "warning"})
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in labels.items()
        ):
            raise SourceError(f"{origin}: alerts.labels: expected a mapping of label names to strings")
        reserved = sorted(set(labels) & {"alertname", "entity", "detector"})
        if reserved:
            raise SourceError(f"{origin}: alerts.labels.{reserved[0]}: set by raywatch, cannot be configured")

        def duration(name: str, default: float, zero_ok: bool = False) -> float:
            value = data.get(name, default)
            if zero_ok and value in (0, "0", "0s"):
                return 0.0
            return parse_duration(value, f"{origin}: alerts.{name}")

        return cls(
            alertmanager=am.rstrip("/") if am else None,
            webhooks=list(hooks),
            for_s=duration("for", 60.0, zero_ok=True),
            resolve_after_s=duration("resolve_after", 60.0, zero_ok=True),
            resend_s=duration("resend", 60.0),
            labels={k: str(v) for k, v in labels.items()},
            timeout_s=duration("timeout", 5.0),
            generator_url=data.get("generator_url"),
        )


class AlertStore(Protocol):
    def load_alerts(self) -> dict[str, dict[str, Any]]: ...

    def save_alerts(self, states: dict[str, dict[str, Any]]) -> None: ...


class AlertmanagerTarget:
    """POST /api/v2/alerts (a JSON list of alerts) to one Alertmanager."""

    def __init__(self, url: str, timeout_s: float = 5.0, retries: int = 2) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(timeout=timeout_s)

    def send(self, alerts: list[dict[str, Any]]) -> None:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.2 * 2**attempt)
            try:
                response = self._http.post(f"{self.url}/api/v2/alerts", json=alerts)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code < 500:
                break  # Alertmanager refused the payload: retrying cannot help
        raise RuntimeError(f"Alertmanager {self.url}: {last}")

    def close(self) -> None:
        self._http.close()


class WebhookTarget:
    """A generic JSON webhook for chat tools: {"text", "status", "alerts": [...]} per change."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = url
        self._http = httpx.Client(timeout=timeout_s)

    def send(self, payload: dict[str, Any]) -> None:
        response = self._http.post(self.url, json=payload)
        if response.status_code >= 300:
            raise RuntimeError(f"webhook {self.url}: HTTP {response.status_code}: {response.text[:200]}")

    def close(self) -> None:
        self._http.close()


class Notifier:
    """Decides firing / resolved per (entity, detector) from scored rows and delivers the changes."""

    def __init__(
        self,
        settings: AlertSettings,
        store: AlertStore | None = None,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.on_error = on_error or (lambda target, exc: log.warning("alert delivery failed: %s: %s", target, exc))
        self.alertmanager = (
            AlertmanagerTarget(settings.alertmanager, settings.timeout_s) if settings.alertmanager else None
        )
        self.webhooks = [WebhookTarget(url, settings.timeout_s) for url in settings.webhooks]
        self.states: dict[str, dict[str, Any]] = store.load_alerts() if store else {}
        self.sent: list[dict[str, Any]] = []  # the changes delivered, newest last (the last 200)
        self.sent_total = 0

    @property
    def enabled(self) -> bool:
        return self.alertmanager is not None or bool(self.webhooks)

    @staticmethod
    def key(entity: str, detector: str) -> str:
        return f"{entity}|{detector}"

    def firing(self) -> list[dict[str, Any]]:
        return [s for s in self.states.values() if s.get("firing")]

    def observe(
        self,
        entity: str,
        detector: str,
        ts: float,
        is_anomaly: bool,
        score: float,
        threshold: float,
        probability: float | None = None,
        top_metric: str | None = None,
    ) -> None:
        """One scored row (in time order per entity and detector)."""
        key = self.key(entity, detector)
        state = self.states.setdefault(
            key,
            {
                "entity": entity,
                "detector": detector,
                "firing": False,
                "anomalous_since": None,
                "quiet_since": None,
                "starts_at": None,
                "ends_at": None,
                "pending": None,  # "firing" / "resolved": a change not yet delivered to Alertmanager
                "hooks_pending": None,  # the same for the webhooks
                "last_sent": 0.0,
            },
        )
        if ts <= (state.get("last_ts") or -math.inf):
            return  # a row seen before (cannot happen with the watcher's cursor; harmless if it does)
        state["last_ts"] = ts
        if is_anomaly:
            state["quiet_since"] = None
            if state["anomalous_since"] is None:
                state["anomalous_since"] = ts
            state["peak"] = max(float(score), state.get("peak") or -math.inf)
            state.update(score=float(score), threshold=float(threshold), probability=probability, top_metric=top_metric)
            if not state["firing"] and ts - state["anomalous_since"] >= self.settings.for_s:
                state.update(firing=True, starts_at=state["anomalous_since"], ends_at=None)
                state["pending"] = state["hooks_pending"] = "firing"
        else:
            if not state["firing"]:
                state["anomalous_since"] = None
                state["peak"] = None
                return
            if state["quiet_since"] is None:
                state["quiet_since"] = ts
            if ts - state["quiet_since"] >= self.settings.resolve_after_s:
                state.update(firing=False, ends_at=state["quiet_since"], anomalous_since=None)
                state["pending"] = state["hooks_pending"] = "resolved"

    # -- delivery -----------------------------------------------------------------------------------------
    def _labels(self, state: dict[str, Any]) -> dict[str, str]:
        name = alert_name(state["detector"])
        return {"alertname": name, "entity": state["entity"], "detector": state["detector"], **self.settings.labels}

    def _alert(self, state: dict[str, Any], now: float) -> dict[str, Any]:
        resolved = not state["firing"]
        what = (
            f"incident probability {state.get('probability') or 0:.2f}"
            if state.get("probability") is not None
            else f"anomaly score {state.get('score', 0):.2f} (threshold {state.get('threshold', 0):.2f})"
        )
        summary = (
            f"{state['entity']}: {state['detector']} back to normal since {iso(state['ends_at'])}"
            if resolved
            else f"{state['entity']}: {state['detector']} flags it since {iso(state['starts_at'])}, {what}"
        )
        alert = {
            "labels": self._labels(state),
            "annotations": {
                "summary": summary,
                "description": (
                    f"{what}; peak score {state.get('peak') or state.get('score', 0):.2f}; "
                    f"top root-cause metric: {state.get('top_metric') or 'n/a'}"
                ),
                "top_metric": str(state.get("top_metric") or ""),
                "score": f"{state.get('score', 0):.4g}",
                "threshold": f"{state.get('threshold', 0):.4g}",
            },
            "startsAt": iso(state["starts_at"]),
            # firing: valid a few resends ahead, so Alertmanager resolves it if raywatch goes away
            "endsAt": iso(state["ends_at"]) if resolved else iso(now + 4 * self.settings.resend_s),
        }
        if self.settings.generator_url:
            alert["generatorURL"] = self.settings.generator_url
        return alert

    def flush(self) -> list[dict[str, Any]]:
        """Deliver the pending changes (and Alertmanager re-sends of firing alerts). Returns what went out."""
        now = self.clock()
        out: list[dict[str, Any]] = []
        if self.alertmanager is not None:
            due = [
                s
                for s in self.states.values()
                if s.get("pending") or (s.get("firing") and now - (s.get("last_sent") or 0) >= self.settings.resend_s)
            ]
            if due:
                alerts = [self._alert(s, now) for s in due]
                try:
                    self.alertmanager.send(alerts)
                except Exception as exc:  # Alertmanager down: keep the changes pending, retry next flush
                    self.on_error("alertmanager", exc)
                else:
                    for s, alert in zip(due, alerts):
                        if s.get("pending"):
                            out.append({"target": "alertmanager", "status": s["pending"], **alert})
                        s["pending"], s["last_sent"] = None, now
        if self.webhooks:
            changed = [s for s in self.states.values() if s.get("hooks_pending")]
            for s in changed:
                alert = self._alert(s, now)
                status = s["hooks_pending"]
                payload = {
                    "version": "1",
                    "status": status,
                    "text": f"[{status.upper()}] {alert['labels']['alertname']}: {alert['annotations']['summary']}",
                    "alerts": [{"status": status, **alert}],
                }
                delivered = True
                for hook in self.webhooks:
                    try:
                        hook.send(payload)
                    except Exception as exc:
                        delivered = False
                        self.on_error(f"webhook {hook.url}", exc)
                if delivered:
                    s["hooks_pending"] = None
                    out.append({"target": "webhook", **payload})
        for s in self.states.values():  # changes nobody is configured to receive
            if self.alertmanager is None:
                s["pending"] = None
            if not self.webhooks:
                s["hooks_pending"] = None
        # forget quiet states that were delivered, so the table does not grow with every blip
        for key in [k for k, s in self.states.items() if not s["firing"] and not s["anomalous_since"]]:
            if not self.states[key].get("pending") and not self.states[key].get("hooks_pending"):
                del self.states[key]
        if self.store is not None:
            self.store.save_alerts(self.states)
        self.sent = (self.sent + out)[-200:]
        self.sent_total += len(out)
        return out

    def close(self) -> None:
        if self.alertmanager:
            self.alertmanager.close()
        for hook in self.webhooks:
            hook.close()
