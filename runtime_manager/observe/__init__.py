"""Watching a node: its status and readiness documents, the last minute of
activity and Prometheus metrics, all fed by the named events of `core.events`."""
