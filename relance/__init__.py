"""Relance: code-first multichannel prospecting cadences.

The domain core. It imports neither Prefect, a connector nor a web framework at import time:
connectors implement `relance.channels` and are loaded by name from config.yaml, and the
Prefect flows in `flows/` drive `relance.dispatch` and `relance.ingest`.
"""

__version__ = "0.1.0"
