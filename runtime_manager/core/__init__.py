"""What every other part of a node stands on: requests, results, errors, the
flows language, topic names, the lifecycle contract of services and the named
events. Nothing here imports another package of the node."""
