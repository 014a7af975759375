"""raywatch train: fit on Ray Train, ONNX export, compression, MLflow registration, the retraining job, and
the Ray job client that submits these entry points."""
