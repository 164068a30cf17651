"""Prefect flows and deployments: they orchestrate the DVC stages, never compute."""
