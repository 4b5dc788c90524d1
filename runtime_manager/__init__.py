"""A runtime manager for edge and IoT nodes."""

__version__ = "1.1.0"
