"""How requests reach a node: the MQTT entry point, REST (with its OpenAPI
description and the status page)."""
