"""Observing a node: named events, metrics."""
