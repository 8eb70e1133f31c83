"""The gateway: ``wsguard proxy`` in front of a WebSocket backend written in anything."""
