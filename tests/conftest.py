"""Shared fixtures: the real Slurm clusters live in tests/conftest_slurm.py."""

from tests.conftest_slurm import (  # noqa: F401  (fixtures)
    slurm_cluster,
    slurm_cluster_factory,
    slurm_cluster_module,
    slurm_cluster_untyped,
    slurm_cluster_untyped_module,
    slurm_multinode,
)
