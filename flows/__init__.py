"""Orchestration: Prefect flows, the catalog fan-out and the CLI (imports stay lazy)."""
