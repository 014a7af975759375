"""Monitoring stage: drift monitors in Ray actors, the drift event store and the retraining trigger."""
