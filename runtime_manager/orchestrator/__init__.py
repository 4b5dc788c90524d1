"""This node as a runtime that edge orchestrators of the Silverline/ARTS family
drive (docs/orchestrator-protocol.md): the messages and dialects (`protocol`),
checking control messages (`control`), running modules (`modules`), and the
runtime service itself (`runtime`)."""
