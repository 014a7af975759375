"""raywatch train: Ray Train entry points, compression, MLflow registration, the retraining pipeline."""
