"""Prefect flows: thin wiring of the core (relance) and the connectors.

A cadence is a state machine in the store, not a flow run per prospect: these short flows
move it forward. Deploy them with prefect.yaml; `relance serve` runs them without a server.
"""
