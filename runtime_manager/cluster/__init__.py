"""Nodes as a group: where a request runs (placement), and later membership."""
