"""raywatch cluster: the local head lifecycle (`up`/`status`/`down`), the demo, cluster and KubeRay manifests
and their offline checks (`manifests.py`), Prometheus/Grafana config."""
