"""The core of a node: requests, results, errors, the flows language and the engine
that runs flows. Nothing here knows of MQTT, REST or orchestrators."""
