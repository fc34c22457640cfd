"""The RunPod template's entrypoint, the script the image runs, as a head and two worker pods.

Each pod is a network namespace with a private /run (tests/support/pods.py); Slurm is Debian's,
configured by the entrypoint like a pod (configless, dynamic nodes, proctrack/linuxproc, task/none:
no job cgroups). The pods come up from env alone; a real Prometheus scrapes every pod's :9400.
One bring-up checks everything in sequence.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest_slurm import require_slurm
from tests.support.pods import ENTRYPOINT, EXE, Pod, PodCluster, pod_processes
from tests.support.prom import Prometheus, require_binaries
from tests.support.slurm_cluster import SBIN_PATH, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.prometheus]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_EXAMPLE = REPO / "docker" / "runpod" / "prometheus.yml"
# Fetches a URL from inside a pod's network namespace (the test itself is outside it).
FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


class PodPrometheus(Prometheus):
    """A real Prometheus inside the head pod's namespaces, where the pods' internal names resolve."""

    def __init__(self, binary: str, config: Path, workdir: Path, pod: Pod) -> None:
        super().__init__(binary, config, workdir)
        self.pod = pod

    def argv(self, port: int) -> list[str]:
        return self.pod.enter(super().argv(port))

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = httpx_url(self.url + path, params or {})
        proc = subprocess.run(self.pod.enter([sys.executable, "-c", FETCH, url]), capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"GET {url}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise TimeoutError("prometheus exited")
        try:
            self._get("/-/ready")
        except RuntimeError:
            return False
        return True

    def _api(self, path: str, params: Any) -> Any:
        body = json.loads(self._get(path, dict(params)))
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body}")
        return body["data"]


def httpx_url(url: str, params: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return f"{url}?{urlencode(params)}" if params else url


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodCluster]:
    require_slurm()
    cluster = PodCluster(tmp_path_factory.mktemp("pods"))
    try:
        cluster.start()
        yield cluster
    finally:
        problems = cluster.stop()
        assert not problems, f"{problems}\n{cluster.log_tails()}"


def status(cluster: PodCluster, pod: Pod) -> dict[str, Any] | None:
    return cluster.status(pod)


def wait_status(cluster: PodCluster, pod: Pod, check: Any, what: str, timeout: float = 90) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        doc = cluster.status(pod)
        return doc if doc is not None and check(doc) else None

    try:
        result: dict[str, Any] = wait_for(ok, timeout, f"{pod.pod_id}: {what}", 0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tails()}") from None
    return result


# The job's first instruction: is a model server still answering on the pod's :8000?
PROBE = ("python3 -c \"import socket; s = socket.socket(); "
         "print('server-up' if s.connect_ex(('127.0.0.1', 8000)) == 0 else 'server-gone', flush=True)\"; sleep 300")


def sbatch(cluster: PodCluster, node: str, gpus: int, output: Path | None = None) -> str:
    proc = cluster.head.run(["sbatch", "--parsable", "-w", node, f"--gres=gpu:{gpus}", "-o", str(output or "/dev/null"),
                             "--chdir=/tmp", "--wrap", PROBE])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_detail(cluster: PodCluster, job: str) -> str:
    return cluster.head.run(["scontrol", "show", "job", "-d", "-o", job]).stdout


def serving(doc: dict[str, Any]) -> bool:
    return bool(doc["state"] == "serving" and doc["server_ready"])


def files_under(top: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_head_and_two_workers_from_env_alone(pods: PodCluster, tmp_path: Path) -> None:
    head, worker_a, worker_b = pods.pods
    print(f"\nhead and two workers idle in sinfo {pods.start_seconds:.2f} s after the first entrypoint started")

    # Workers registered by themselves, named by their pod id (not the container's host name), with GPUs.
    assert pods.sinfo() == {p.pod_id: ("idle", "gpu:2") for p in pods.pods}
    for pod in pods.pods:
        assert pod.hostname not in pods.sinfo()
        wait_status(pods, pod, serving, "serving on its idle GPU")
    conf = (head.root / "etc" / "slurm" / "slurm.conf").read_text()
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SlurmctldParameters=enable_configless",
                 "TreeWidth=65533", "Prolog=/run/exporter-watchdog/prolog.sh", "GresTypes=gpu"):
        assert line in conf.splitlines()
    assert "no Slurm exporter at /usr/local/bin/slurm_exporter: :9341 is not served" in head.text()

    # `targets` on the head lists every pod at its internal name.
    out = tmp_path / "prometheus"
    (out / "targets").mkdir(parents=True)
    proc = head.cli("targets", "--domain", "runpod.internal", "-o", str(out / "targets" / "runpod.json"))
    assert proc.returncode == 0, proc.stderr
    groups = json.loads((out / "targets" / "runpod.json").read_text())
    daemons = {g["labels"]["node"]: g["targets"][0] for g in groups if g["labels"]["job"] == "exporter-watchdog"}
    assert daemons == {p.pod_id: f"{p.internal}:9400" for p in pods.pods}

    # A real Prometheus (the template's example config) scrapes every pod's :9400.
    binary = require_binaries("prometheus")["prometheus"]
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    (out / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = PodPrometheus(binary, out / "prometheus.yml", out, head)
    prom.start()
    try:
        nodes = {p.pod_id for p in pods.pods}

        def per_node(expr: str) -> bool:
            found = {r["metric"].get("node") for r in prom.query(expr)}
            return found == nodes

        wait_for(lambda: per_node('up{job="exporter-watchdog"} == 1'), 90, "up == 1 for every pod's :9400")
        wait_for(lambda: per_node("count by (node) (DCGM_FI_DEV_GPU_UTIL)"), 60, "DCGM families from every pod")
        wait_for(lambda: per_node('exporter_watchdog_state{state="serving"} == 1'), 60, "daemon families")
    finally:
        prom.close()

    # A job on worker a's free GPU: listed through squeue, the server keeps running.
    before = wait_status(pods, worker_a, serving, "serving")
    assert before["claimed_gpus"] == [1]
    other_b = wait_status(pods, worker_b, serving, "serving")["server_pid"]
    free_job = sbatch(pods, worker_a.pod_id, 1)
    doc = wait_status(pods, worker_a, lambda d: any(j["job_id"] == free_job and j["source"] == "squeue"
                                                    for j in d["jobs"]), "the first job listed by squeue")
    assert {"job_id": free_job, "gpus": [0], "source": "squeue"} in doc["jobs"]
    assert doc["server_pid"] == before["server_pid"] and doc["state"] == "serving"

    # A job on the server's GPU: its first instruction finds the server gone (the Prolog waits for
    # that), and squeue lists it with its GPU while it runs.
    t0 = time.monotonic()
    output = worker_a.root / "job.out"
    taking = sbatch(pods, worker_a.pod_id, 1, output)
    doc = wait_status(pods, worker_a, lambda d: d["server_pid"] is None, "the server to yield")
    assert doc["last_yield"]["jobs"] == [taking]
    # Which signal stops the server depends on where squeue's interval falls: the Prolog, or squeue.
    assert doc["last_yield"]["reason"] in ("prolog", "job")
    print(f"sbatch to server gone on worker a: {time.monotonic() - t0:.2f} s (by {doc['last_yield']['reason']})")
    doc = wait_status(pods, worker_a, lambda d: {"job_id": taking, "gpus": [1], "source": "squeue"} in d["jobs"],
                      "the job on our GPU listed by squeue")
    assert "JobState=RUNNING" in job_detail(pods, taking)
    assert re.search(r"GRES=gpu(:\w+)?:1\(IDX:1\)", job_detail(pods, taking))
    wait_for(lambda: output.exists() and output.read_text().strip(), 60, "the job's first line")
    assert output.read_text().split() == ["server-gone"]
    prolog_log = (worker_a.root / "var" / "log" / "exporter-watchdog" / "prolog.log").read_text()
    assert f"job {free_job}: GPUs [0] were not ours" in prolog_log
    assert re.search(rf"job {taking}: GPUs \[1\] (released, the server is gone|were not ours)", prolog_log)
    # Other pods are not affected.
    assert wait_status(pods, worker_b, serving, "serving")["server_pid"] == other_b
    pods.head.run(["scancel", taking])
    wait_status(pods, worker_a, lambda d: serving(d) and d["claimed_gpus"] == [1], "serving again")

    # The key: only in the key files (0400, owned by munge); never in any other file or environment.
    key_b64 = base64.b64encode(pods.munge_key)
    for pod in pods.pods:
        key_file = pod.root / "etc" / "munge" / "munge.key"
        st = key_file.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o400, pwd.getpwnam("munge").pw_uid)
        assert key_file.read_bytes() == pods.munge_key
        assert not (pod.root / "etc" / "rp_environment").exists()
        pod_run = Path(f"/proc/{pod.pid}/root/run")
        for path in [*files_under(pod.root), *files_under(pod_run)]:
            if path == key_file:
                continue
            data = path.read_bytes()
            assert pods.munge_key not in data and key_b64 not in data, f"key material in {path}"
        assert key_b64 not in pod.log.read_bytes()
        assert pod.ns is not None
        for pid in pod_processes(pod.ns):
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"MUNGE_KEY" not in environ and key_b64 not in environ, f"pid {pid} has the key in its env"

    # A child that dies ends the pod, non-zero, with everything of it stopped.
    slurmd = worker_b.child_pid("slurmd")
    assert slurmd is not None
    os.kill(slurmd, 9)
    assert worker_b.proc is not None
    code = worker_b.proc.wait(90)
    assert code != 0
    assert f"slurmd (pid {slurmd}) exited" in worker_b.text()
    assert worker_b.ns is not None and pod_processes(worker_b.ns) == []

    # SIGTERM: the daemon first (it stops its server), then the rest; exit 0, nothing left. Jobs are
    # cancelled first: their processes are not the entrypoint's (a container's stop ends them).
    pods.head.run(["scancel", free_job])
    wait_for(lambda: not pods.head.run(["squeue", "-h", "-o", "%A"]).stdout.strip(), 60, "an empty queue")
    for pod in (worker_a, head):
        assert pod.proc is not None
        pod.proc.terminate()
        assert pod.proc.wait(90) == 0, pod.text()[-3000:]
        text = pod.text()
        first = text.index("stopping exporter-watchdog")
        server_gone = re.compile(r"server pid \d+ stopped").search(text, first)
        assert server_gone is not None, text[-3000:]
        assert first < server_gone.start() < text.index("stopping slurmd") < text.index("stopping munged")
        assert pod.ns is not None and pod_processes(pod.ns) == []


def run_entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint with a bad environment, in a mount namespace of its own (a private /run)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EW_", "RUNPOD_", "MUNGE"))}
    base.update({"PATH": f"{base.get('PATH', '')}:{SBIN_PATH}", "EXPORTER_WATCHDOG": EXE,
                 "EW_ROOT": str(tmp_path / "root"), "RUNPOD_POD_ID": "podx", "RUNPOD_GPU_COUNT": "2",
                 "EW_SIMULATED_GPUS": "1"})
    base.update(env)
    (tmp_path / "root").mkdir(exist_ok=True)
    argv = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /run && exec bash "$@"', "sh", str(ENTRYPOINT)]
    return subprocess.run(argv, env=base, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env, named, problem", [
    ({"NODE_ROLE": "head"}, "MUNGE_KEY", "missing"),
    ({"NODE_ROLE": "head", "MUNGE_KEY": base64.b64encode(b"k" * 31).decode()}, "MUNGE_KEY", "too short: 31 bytes"),
    ({"NODE_ROLE": "head", "MUNGE_KEY": "not base64!"}, "MUNGE_KEY", "not valid base64"),
    ({"NODE_ROLE": "worker", "MUNGE_KEY": base64.b64encode(b"k" * 32).decode()}, "HEAD_NODE_HOST", "missing"),
    ({"MUNGE_KEY": base64.b64encode(b"k" * 32).decode()}, "NODE_ROLE", "missing"),
])
def test_a_missing_or_bad_variable_exits_non_zero_naming_it_and_starts_nothing(
    tmp_path: Path, env: dict[str, str], named: str, problem: str,
) -> None:
    require_slurm()
    proc = run_entrypoint(tmp_path, **env)
    assert proc.returncode == 2, proc.stderr
    assert f"{named}: {problem}" in proc.stderr and "nothing was started" in proc.stderr
    assert "entrypoint: started" not in proc.stderr
    assert list((tmp_path / "root").iterdir()) == []  # not even a folder was made
    if "MUNGE_KEY" in env:
        assert env["MUNGE_KEY"] not in proc.stderr + proc.stdout
