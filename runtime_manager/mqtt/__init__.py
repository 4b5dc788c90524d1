"""The process's one MQTT connection (`link`), used by the MQTT entry point,
the group's membership and forwarding, the orchestrator runtime and the tools."""
