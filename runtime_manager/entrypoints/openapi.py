"""`GET /openapi.json`: the REST API described in OpenAPI 3.1, from the node's
own configuration (its flow endpoint, its load-balancer path, whether a token
is needed).

It is the one description of the API: the Postman collection in
`test/postman_collection.json` is generated from it (`python -m
runtime_manager.entrypoints.openapi --postman`), a test runs schemathesis
against a live node with it, and every status code the node answers is listed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .. import __version__
from ..config import Config, RestConfig
from ..core.errors import HTTP_STATUS
from ..core.flows import CatchBlock, Fail, IfBlock, ParallelBlock, Publish, Return, RunFlow, natural_order, walk_steps

ERROR_CODES = sorted(HTTP_STATUS)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# JSON numbers beyond 64 bits are read as floating point, which ids must not be
WHOLE_NUMBER = {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}

SCHEMAS: dict[str, Any] = {
    "FlowRequest": {
        "type": "object",
        "required": ["id_flow"],
        "properties": {
            "id_flow": {"description": "a flow of flows.conf (the flow endpoint's description lists them)",
                        "anyOf": [{"type": "string", "minLength": 1}, WHOLE_NUMBER]},
            "payload": {"description": "any JSON value; becomes `payload` in the flow's POST steps"},
            "request_id": {"description": "echoed in the result (null or absent: the node makes one)",
                           "anyOf": [{"type": ["string", "null"]}, WHOLE_NUMBER]},
            "is_load_balancing": {"type": "boolean", "default": False,
                                  "description": "true: placed by a peer, run here without asking the load balancer"},
        },
        "example": {"id_flow": "1", "payload": "0x03abcdefghil"},
    },
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "one of " + ", ".join(ERROR_CODES) + " (and, for requests "
                                                                                           "that are not about a flow, "
                                                                                           "unauthorized, not_found, "
                                                                                           "method_not_allowed, not_ready)"},
            "message": {"type": "string"},
            "step": {"type": ["integer", "null"], "description": "the flow step that failed"},
        },
    },
    "Placement": {
        "type": "object",
        "required": ["asked", "chosen", "reason"],
        "properties": {
            "asked": {"type": "string", "description": "lb, policy, least_loaded, local_first or none"},
            "chosen": {"type": "string", "description": "home, or \"node N\""},
            "reason": {"type": "string"},
            "tried": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Result": {
        "type": "object",
        "required": ["request_id", "id_flow", "status", "node"],
        "properties": {
            "request_id": {"type": ["string", "null"]},
            "id_flow": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": ["ok", "error"]},
            "node": {"type": "string", "description": "the node that ran the flow"},
            "results": {"type": "array", "items": {},
                        "description": "when ok: one entry per request of the flow (resultN; null for a request "
                                       "that did not run: a branch not taken, an OPTIONAL one that failed)"},
            "result": {"description": "when ok, instead of `results`: the answer the flow chose (RETURN)"},
            "error": _ref("Error"),
            "elapsed_ms": {"type": "number"},
            "placement": _ref("Placement"),
            "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                         "description": "the trace of this request's spans (only while runtime.conf tracing is on)"},
        },
    },
    "PlainError": {
        "type": "object",
        "required": ["status", "error"],
        "properties": {"status": {"type": "string", "enum": ["error"]}, "error": _ref("Error")},
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "reasons"],
        "properties": {"ready": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}},
                       "node": {"type": "string"}},
    },
    "Status": {
        "type": "object",
        "required": ["node", "accepting", "in_flight", "queued", "queue_depth", "workers", "accepted", "ok", "error",
                     "overloaded"],
        "properties": {
            "node": {"type": "string"}, "accepting": {"type": "boolean"},
            **{k: {"type": "integer", "minimum": 0} for k in ("in_flight", "queued", "queue_depth", "workers", "accepted",
                                                             "ok", "error", "overloaded")},
            "by_entrypoint": {"type": "object", "additionalProperties": {"type": "integer"}},
            "pid": {"type": "integer"}, "uptime_s": {"type": "number"},
            "entrypoints": {"type": "array", "items": {"type": "string"}},
            "config": {"type": "object", "description": "directory, flows, reloads and the last reload's outcome"},
            "mqtt": {"type": "object"}, "placement": {"type": "object", "description": "policy, load, the peer table"},
            "orchestrator": {"type": "object"},
            "tracing": {"type": "object", "description": "where spans go, and how many were sent, failed, dropped"},
            "flows_last_minute": {"type": "object", "description": "per flow: requests, errors, p50_ms, p99_ms",
                                  "additionalProperties": {"type": "object"}},
            "last_errors": {"type": "array", "items": {"type": "object"}},
        },
    },
    "MoveReport": {
        "type": "object",
        "required": ["module", "uuid", "source", "target", "moved", "with_state"],
        "properties": {"module": {"type": "string"}, "uuid": {"type": "string"}, "source": {"type": "string"},
                       "target": {"type": "string"}, "moved": {"type": "boolean"}, "with_state": {"type": "boolean"},
                       "why": {"type": ["string", "null"]}, "pause_ms": {"type": ["number", "null"]},
                       "checkpoint_bytes": {"type": "integer"}, "object_id": {"type": ["string", "null"]},
                       "move_id": {"type": ["string", "null"]}},
    },
    "LoadBalancerAnswer": {
        "type": "object",
        "required": ["id_node"],
        "properties": {"id_node": {"type": ["integer", "string"]},
                       "policy": {"type": "string"}, "reason": {"type": "string"}},
    },
}


def _flow_list(config: Config) -> str:
    """One Markdown line per flow: its id, its requests and what it uses of the language."""
    words = ((IfBlock, "IF"), (ParallelBlock, "PARALLEL"), (RunFlow, "RUN"), (Publish, "PUBLISH"),
             (Return, "RETURN"), (Fail, "FAIL"), (CatchBlock, "ON ERROR"))
    lines = []
    for flow_id in sorted(config.flows, key=natural_order):
        flow = config.flows[flow_id]
        steps = walk_steps(flow.steps)
        used = [word for kind, word in words if any(isinstance(s, kind) for s in steps)]
        lines.append(f"- `{flow_id}`: {len(flow.calls)} request(s)" + (f"; {', '.join(used)}" if used else ""))
    return "\n".join(lines)


def api_description(config: Config | None = None, flows: bool = True) -> dict[str, Any]:
    """The description of a node's API; `flows=False`: the watching endpoints only (runtime.conf http_port)."""
    rest = config.rest if config is not None else RestConfig()
    result, plain = _ref("Result"), _ref("PlainError")
    common: dict[str, Any] = {"405": _json_body(plain, "method not allowed on this path")}
    if rest.token:
        common["401"] = _json_body(plain, "missing or wrong bearer token")

    def get(summary: str, ok: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": ok, **more, **common}}}

    flow_errors = {str(status): _json_body(result, f"{status}: " + ", ".join(c for c, s in HTTP_STATUS.items() if s == status))
                   for status in sorted(set(HTTP_STATUS.values()))}
    flow_list = _flow_list(config) if config is not None else ""
    paths: dict[str, Any] = {
        rest.endpoint: {"post": {
            "summary": "Run a flow; answers its one result",
            "description": "The flows of this node (flows.conf, as loaded; `check --explain <flow>` prints a plan):\n\n"
                           + (flow_list or "(the node's own)"),
            "parameters": [{"name": "traceparent", "in": "header", "required": False, "schema": {"type": "string"},
                            "description": "W3C trace context: the request's spans join this trace (tracing on)"}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("FlowRequest")}}},
            "responses": {"200": _json_body(result, "the flow ran: one result per step"), **flow_errors,
                          "413": _json_body(result, "body larger than rest.max_body_bytes"), **common},
        }},
        "/health": get("The original's health check", _json_body(
            {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}, "ok")),
        "/livez": get("The process serves", _json_body(
            {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["alive"]}}},
            "alive")),
        "/readyz": get("The node takes requests", _json_body(_ref("Readiness"), "ready"),
                       **{"503": _json_body(_ref("Readiness"), "not ready; `reasons` says why")}),
        "/status": get("The node: counters, connections, placement and its peers, configuration",
                       _json_body(_ref("Status"), "the node's status")),
        rest.lb_endpoint: get("This node as a load balancer: the node to run the next flow on",
                              _json_body(_ref("LoadBalancerAnswer"), "the chosen node"),
                              **{"503": _json_body(plain, "the node is starting")}),
        "/metrics": get("Prometheus metrics (text format 0.0.4)", {
            "description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        "/modules/{module}/migrate": {"post": {
            "summary": "Move an orchestrator module (name or uuid) to another runtime of the realm, with its state "
                       "when it can; answers how the move went",
            "parameters": [{"name": "module", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}}}}},
            "responses": {"200": _json_body(_ref("MoveReport"), "it moved (with_state says whether it went on)"),
                          "409": _json_body(_ref("MoveReport"), "it stayed where it was; `why` says why"),
                          "400": _json_body(plain, "no runtime named in the body"),
                          "404": _json_body(plain, "no such module or runtime, or no orchestrator runtime here"),
                          "504": _json_body(plain, "the move did not finish in time"), **common},
        }},
        "/openapi.json": get("This description", _json_body({"type": "object"}, "OpenAPI 3.1")),
        "/ui": {"get": {"summary": "A live status page for people (reads /status and /readyz; asks for the token)",
                        "security": [], "responses": {"200": {"description": "the page",
                                                              "content": {"text/html": {"schema": {"type": "string"}}}},
                                                      "405": common["405"]}}},
    }
    if not flows:
        del paths[rest.endpoint], paths[rest.lb_endpoint], paths["/modules/{module}/migrate"]
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Runtime manager REST API", "version": __version__,
                 "description": "Run flows and watch a runtime manager node. Every error answer is JSON."},
        "servers": [{"url": f"http://{rest.host}:{rest.port}"}],
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if rest.token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


# ----- the Postman collection, generated from the description -----------------------------------
EXAMPLE_FLOW = {"id_flow": "1", "payload": "0x03abcdefghil"}


def _postman_test(status: int, required: list[str], content_type: str) -> list[str]:
    lines = [f'pm.test("status {status}", function () {{ pm.response.to.have.status({status}); }});']
    if content_type == "application/json":
        lines.append('pm.test("JSON body with its fields", function () {')
        lines.append("    const body = pm.response.json();")
        lines += [f'    pm.expect(body).to.have.property("{key}");' for key in required]
        lines.append("});")
    else:
        lines.append(f'pm.test("{content_type}", function () {{')
        lines.append(f'    pm.expect(pm.response.headers.get("Content-Type")).to.include("{content_type}");')
        lines.append("});")
    return lines


def postman_collection(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Postman collection (v2.1) with one request per operation of `doc`, each
    with tests of its status code and the required fields of its answer;
    plus the error answers people meet first (unknown flow, bad request)."""
    doc = doc or api_description()
    schemas = doc["components"]["schemas"]

    def required_of(response: dict[str, Any]) -> tuple[list[str], str]:
        content_type, media = next(iter(response["content"].items()))
        schema = media["schema"]
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return list(schema.get("required", [])), content_type

    items = []
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            cases = [(op["summary"], 200, EXAMPLE_FLOW)]
            if method == "post":
                cases += [("Unknown flow", 404, {"id_flow": "no-such-flow"}), ("Bad request", 400, {"payload": 1})]
            if path == "/modules/{module}/migrate":  # the collection's node has no orchestrator runtime
                cases = [("Move a module (this node runs no orchestrator runtime)", 404, {"to": "node2"})]
                path = path.replace("{module}", "ticker")
            for name, status, body in cases:
                required, content_type = required_of(op["responses"][str(status)])
                request: dict[str, Any] = {"method": method.upper(), "header": [],
                                           "url": {"raw": "{{base_url}}" + path, "host": ["{{base_url}}"],
                                                   "path": [p for p in path.split("/") if p]}}
                if method == "post":
                    request["header"] = [{"key": "Content-Type", "value": "application/json"}]
                    request["body"] = {"mode": "raw", "raw": json.dumps(body)}
                items.append({"name": f"{method.upper()} {path}: {name}", "request": request,
                              "event": [{"listen": "test", "script": {"type": "text/javascript",
                                                                      "exec": _postman_test(status, required, content_type)}}]})
    return {
        "info": {"name": doc["info"]["title"],
                 "description": "Generated from GET /openapi.json (python -m runtime_manager.entrypoints.openapi --postman). "
                                "Set base_url to a node; with rest.token set, add an Authorization: Bearer <token> header. "
                                "`make test` runs it with newman against a live node.",
                 "schema": "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"},
        "variable": [{"key": "base_url", "value": "http://127.0.0.1:5000"}],
        "item": items,
    }


if __name__ == "__main__":  # python -m runtime_manager.entrypoints.openapi [--postman]
    out = postman_collection() if "--postman" in sys.argv else api_description()
    print(json.dumps(out, indent=2))
