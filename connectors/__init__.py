"""Connectors: one module per provider, each registering its channel classes with relance.channels.register."""
