"""Prefect flows and deployments: thin wrappers over `mmfusion.stages`."""
