"""Ingest stage: telemetry in from Prometheus (source client, live watcher) and alerts out."""
