"""Fixtures that bring up a real Slurm: import them into tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.netns import SlurmMultiNode
from tests.support.slurm_cluster import (
    SlurmCluster,
    SlurmUnavailable,
    ensure_slurm,
    in_ci,
    unique_name,
)


def require_slurm(ensure: Callable[[], None] = ensure_slurm) -> None:
    """Install Slurm if it can be; otherwise fail the test in CI and skip it elsewhere."""
    try:
        ensure()
    except SlurmUnavailable as exc:
        if in_ci():
            pytest.fail(f"Slurm is required when CI=true: {exc}", pytrace=False)
        pytest.skip(f"no Slurm here: {exc}")


def _stop(cluster: SlurmCluster | SlurmMultiNode) -> None:
    """Tear a cluster down and fail loudly if anything was left behind."""
    problems = cluster.stop()
    left = cluster.leftovers()
    if problems or left:
        pytest.fail(f"Slurm teardown left things behind: {problems + left}", pytrace=False)


@pytest.fixture(scope="module")
def slurm_cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node `gpu:a30:4`, 4 CPUs, shared by a test module."""
    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-typed"), node=unique_name("wdt")).start()
    yield cluster
    _stop(cluster)


@pytest.fixture
def slurm_cluster(slurm_cluster_module: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's typed cluster, with every job cancelled after each test."""
    yield slurm_cluster_module
    if slurm_cluster_module.daemons["slurmctld"].alive():
        slurm_cluster_module.cancel_all()


@pytest.fixture(scope="module")
def slurm_cluster_untyped_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node with untyped GRES `gpu:4`, shared by a test module."""
    require_slurm()
    cluster = SlurmCluster(
        tmp_path_factory.mktemp("slurm-untyped"), node=unique_name("wdu"), gpu_type=None
    ).start()
    yield cluster
    _stop(cluster)


@pytest.fixture
def slurm_cluster_untyped(slurm_cluster_untyped_module: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's untyped cluster, with every job cancelled after each test."""
    yield slurm_cluster_untyped_module
    if slurm_cluster_untyped_module.daemons["slurmctld"].alive():
        slurm_cluster_untyped_module.cancel_all()


@pytest.fixture
def slurm_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SlurmCluster]]:
    """Make fresh clusters with any SlurmCluster arguments (a Prolog, other GPU counts); stopped after."""
    require_slurm()
    made: list[SlurmCluster] = []

    def make(**kwargs: Any) -> SlurmCluster:
        kwargs.setdefault("node", unique_name("wdf"))
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in reversed(made):
        _stop(cluster)


@pytest.fixture(scope="module")
def slurm_multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmMultiNode]:
    """A head and two configless workers with `gpu:2` each, in network namespaces."""
    require_slurm()
    cluster = SlurmMultiNode(tmp_path_factory.mktemp("slurm-multi")).start()
    yield cluster
    _stop(cluster)
