"""raywatch cluster: the CLI, local cluster lifecycle, job submission, cluster configs."""
