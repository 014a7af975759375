"""raywatch detect: telemetry loaders, synthetic fleet, features + FeatureSpec, detectors, metrics, drift."""

from detect.data import TelemetryError, load_benchmark, load_series, load_telemetry
from detect.features import FeatureSpec

__all__ = ["FeatureSpec", "TelemetryError", "load_benchmark", "load_series", "load_telemetry"]
