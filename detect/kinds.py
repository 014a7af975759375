"""The detector kinds raywatch trains, registers and serves: one name each, with the traits that the
light layers (the Serve ingress, the Prometheus watcher, alerting, the CLI) need without importing a
kind's code (torch, the boosters).

A kind's behaviour (fit on Ray, ONNX graphs, serving runtime, tuning, compression) is its plug-in in
`train/kinds.py`; these traits are the part of it that is plain data, so stages below `train` and the
ingress can ask "which kind forecasts?" or "which kind needs labels?" instead of naming one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindTraits:
    name: str
    deployment: str  # its Ray Serve deployment's name
    learns_from_labels: bool  # supervised: fits on labelled incidents, so a label-free source cannot train it
    forecasts: bool  # answers /v1/forecast
    probability: bool  # its score is an incident probability (alerts say "incident likely", not "anomaly")


_TRAITS = (
    KindTraits("autoencoder", "AutoencoderDetector", learns_from_labels=False, forecasts=False, probability=False),
    KindTraits("lstm", "LSTMDetector", learns_from_labels=False, forecasts=True, probability=False),
    KindTraits("ensemble", "EnsembleDetector", learns_from_labels=True, forecasts=False, probability=True),
)
KIND_TRAITS: dict[str, KindTraits] = {t.name: t for t in _TRAITS}

# The order is the order in which `raywatch up` trains and `raywatch models` lists them. Written out
# because the offline manifest check (`cluster.manifests`, which imports nothing) reads it from this source.
DETECTOR_KINDS: tuple[str, ...] = ("autoencoder", "lstm", "ensemble")
if DETECTOR_KINDS != tuple(KIND_TRAITS):
    raise ImportError(
        f"detect.kinds: DETECTOR_KINDS {DETECTOR_KINDS} must list the kinds of KIND_TRAITS {tuple(KIND_TRAITS)}"
    )
# the kind whose deployment answers /v1/forecast
FORECASTER: str = next(t.name for t in _TRAITS if t.forecasts)


def traits_of(kind: str) -> KindTraits:
    try:
        return KIND_TRAITS[kind]
    except KeyError:
        raise ValueError(f"unknown detector kind {kind!r}; choose from {list(DETECTOR_KINDS)}") from None
