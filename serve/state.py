"""Durable serving state lives in `detect.state` (shared with the drift monitors and retraining jobs)."""

from detect.state import ServingStore, state_dir

__all__ = ["ServingStore", "state_dir"]
