"""Tracing: one request followed across nodes, as OpenTelemetry spans.

A request may carry W3C trace context (`traceparent`: an HTTP header, or an
MQTT 5 user property); a node goes on with that trace, or starts one. Spans:
the request (`flow <id>`, from its arrival to its result), `accept` (its wait
in the queue), `placement`, `forward to node <id>` (the context travels to the
peer over REST or MQTT), one per step (an outgoing HTTP call carries
`traceparent`; a WebAssembly step has its limits as attributes) and `result`
(handing it to the entry point). The trace id goes into the result
(`trace_id`) and the request's log lines.

Spans are exported over OTLP/HTTP (protobuf) to runtime.conf
`tracing.otlp_endpoint` from the node's loop, in batches; off when that
is absent (then a request costs one attribute test). `spans.py` records,
`otlp.py` encodes and sends.
"""

from .spans import RequestSpan, Tracer, TracingConfig

__all__ = ["RequestSpan", "Tracer", "TracingConfig"]
