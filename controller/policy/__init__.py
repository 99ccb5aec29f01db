"""QoS policy files: schema and validation, compilation to switch entries, reload."""
