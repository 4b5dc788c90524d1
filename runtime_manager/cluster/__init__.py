"""Nodes as a group: the peer table, membership over the broker, where a
request runs (placement) and forwarding to peers."""
