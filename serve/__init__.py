"""raywatch serve: the Ray Serve application (deployments, router, schemas, auth, config)."""
