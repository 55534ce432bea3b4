"""The strategy layer: one registry of strategies (registry.py), one module per strategy with its protobuf
conversion, availability check and plan resolution, and the group context plans are resolved in (context.py)."""
