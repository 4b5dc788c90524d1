"""How requests reach a node: the MQTT link and entry point, and REST."""
