"""Every MQTT topic name the node and its tools use, built in one place, and
the rules a topic name must follow to be published to.

A node's own topics (comm.conf `mqtt.topic` is the base):

    <topic>                              flow requests (shared by a node's workers)
    <topic>/node/<id>                    requests forwarded to node <id> by its peers
    <topic>/node/<id>/answers/<worker>   the answers to what a worker forwarded
    <status_prefix>/<id>                 a node's retained status and its load reports (membership;
                                         the default group)
    <status_prefix>/group/<group>/<id>   the same for a node of a named group (runtime.conf `group`)
    <status_prefix>/<id>/control         commands to a running node (`reload --all`)

The orchestrator protocol's, in realm `<realm>` (docs/orchestrator-protocol.md):

    <realm>/proc/reg/<uuid>              registration (ARTS: one topic, <realm>/proc/reg)
    <realm>/proc/control[/<runtime>]     module create/delete in, exited out
    <realm>/proc/keepalive/<runtime>     keepalives
    <realm>/proc/stdio/<module>          a module's standard output
    <realm>/rm/presence/<runtime>        our own, retained: who a runtime is and when it was last heard
    <realm>/rm/query                     our own: a tool asks, every runtime answers
    <realm>/rm/migrate/<runtime>         our own: a module's move, to that runtime (and its answers)
    <realm>/rm/moved/<module>            our own: how a module's move went
    <realm>/rm/checkpoint/<runtime>/<module>  our own, retained: a module's latest checkpoint
"""

from __future__ import annotations

MAX_TOPIC_BYTES = 65535


# ----- a node's own ----------------------------------------------------------------------
def node_topic(topic: str, node_id: str) -> str:
    """A node's own request topic, where peers forward to."""
    return f"{topic}/node/{node_id}"


def answers_topic(topic: str, node_id: str, worker: str) -> str:
    """Where the answers to what one worker of a node forwarded come back."""
    return f"{topic}/node/{node_id}/answers/{worker}"


def status_topic(prefix: str, node_id: str, group: str = "") -> str:
    """A node's retained status (and its small load reports, not retained):
    `<prefix>/<id>` in the default group, `<prefix>/group/<group>/<id>` in a named one."""
    return f"{prefix}/{node_id}" if not group else f"{prefix}/group/{group}/{node_id}"


def status_filters(prefix: str, group: str | None = None) -> list[str]:
    """What to subscribe to for the statuses of one group (`""`: the default
    one), or of the whole realm (None): every group, read on demand."""
    if group is None:
        return [f"{prefix}/+", f"{prefix}/group/+/+"]
    return [status_topic(prefix, "+", group)]


def node_control_topic(prefix: str, node_id: str) -> str:
    """Commands to one running node (`+` for every node of the group)."""
    return f"{prefix}/{node_id}/control"


# ----- the orchestrator protocol's ---------------------------------------------------------
def reg_topic(realm: str, ident: str, arts: bool = False) -> str:
    return f"{realm}/proc/reg" if arts else f"{realm}/proc/reg/{ident}"


def control_topic(realm: str, runtime: str | None = None) -> str:
    """A runtime's control topic; without a runtime, the orchestrator's own."""
    return f"{realm}/proc/control" if runtime is None else f"{realm}/proc/control/{runtime}"


def keepalive_topic(realm: str, runtime: str) -> str:
    return f"{realm}/proc/keepalive/{runtime}"


def stdio_topic(realm: str, module: str) -> str:
    return f"{realm}/proc/stdio/{module}"


def presence_topic(realm: str, runtime: str = "+") -> str:
    return f"{realm}/rm/presence/{runtime}"


def query_topic(realm: str) -> str:
    return f"{realm}/rm/query"


def migrate_topic(realm: str, runtime: str) -> str:
    """Where a runtime takes moving modules (and a mover takes the answers)."""
    return f"{realm}/rm/migrate/{runtime}"


def moved_topic(realm: str, module: str = "+") -> str:
    """How a module's move went, for whoever asked for it."""
    return f"{realm}/rm/moved/{module}"


def checkpoint_topic(realm: str, runtime: str = "+", module: str = "+") -> str:
    """A module's latest checkpoint, retained, under the runtime it ran on."""
    return f"{realm}/rm/checkpoint/{runtime}/{module}"


# ----- rules ---------------------------------------------------------------------------------
def _noncharacter(code: int) -> bool:
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (the MQTT spec's rules for topic names
    and what brokers refuse), or None."""
    if not topic:
        return "is empty"
    if "#" in topic or "+" in topic:
        return "holds a wildcard (# or +)"
    if topic.startswith("$"):
        return "starts with '$' (reserved for the broker)"
    if topic.isascii() and topic.isprintable():  # the usual case: no control characters, one byte each
        return None if len(topic) <= MAX_TOPIC_BYTES else f"is {len(topic)} bytes long (at most {MAX_TOPIC_BYTES})"
    for i, ch in enumerate(topic):
        code = ord(ch)
        if code == 0 or code < 0x20 or 0x7F <= code <= 0x9F:
            return f"holds control character U+{code:04X} at {i}"
        if _noncharacter(code) or 0xD800 <= code <= 0xDFFF:
            return f"holds U+{code:04X} at {i}, not a character"
    size = len(topic.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return f"is {size} bytes long (at most {MAX_TOPIC_BYTES})"
    return None


