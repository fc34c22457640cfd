"""Helpers that bring up real services (Slurm, network namespaces) for the integration tests."""
