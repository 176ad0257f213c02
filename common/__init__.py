"""The contract every sandfleet process shares: models, events, topology, settings."""
