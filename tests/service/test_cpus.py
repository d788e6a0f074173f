"""The CPUs the server counts: its CPU set, at most its container's CPU quota (cgroup v1 and v2
files laid out in a temporary folder as Docker and Kubernetes lay them out)."""

import pytest

from service import cpus
from service.cpus import cgroup_cpu_quota, usable_cpus
from tests.service.test_settings import parse


def cgroup(tmp_path, proc: str, files: dict[str, str]):
    """A cgroup mount under tmp_path/fs with `files` (path -> text) and a /proc/self/cgroup."""
    root = tmp_path / "fs"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text(proc)
    return root, tmp_path / "cgroup"


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)


def test_a_v2_quota_caps_the_cpu_set_rounded_down(tmp_path, eight_cpus):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "250000 100000\n"})  # docker run --cpus 2.5
    assert cgroup_cpu_quota(root, proc) == 2.5
    assert usable_cpus(root, proc) == 2  # 3 threads would be throttled every period


def test_a_limit_on_an_ancestor_applies_to_its_children(tmp_path, eight_cpus):
    root, proc = cgroup(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        {"kubepods/pod1/c1/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "400000 100000\n"},
    )
    assert cgroup_cpu_quota(root, proc) == 4.0 and usable_cpus(root, proc) == 4


def test_a_v1_quota_is_read_where_the_container_mounts_its_own_cgroup(tmp_path, eight_cpus):
    # /proc/self/cgroup names the host's path; inside the container the cpu hierarchy's root is its own
    proc_text = "4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    root, proc = cgroup(tmp_path, proc_text, files)
    assert cgroup_cpu_quota(root, proc) == 3.0 and usable_cpus(root, proc) == 3


@pytest.mark.parametrize(
    "proc, files",
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}),  # v2, no limit
        ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}),  # v1, none
        ("0::/\n", {}),  # no files to read
    ],
)
def test_without_a_quota_the_cpu_set_counts(tmp_path, eight_cpus, proc, files):
    root, proc_path = cgroup(tmp_path, proc, files)
    assert cgroup_cpu_quota(root, proc_path) is None
    assert usable_cpus(root, proc_path) == 8


def test_a_quota_under_one_cpu_still_counts_one(tmp_path, eight_cpus):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert usable_cpus(root, proc) == 1


def test_the_models_default_threads_follow_the_quota(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: 4.0)  # docker run --cpus 4 on 16 CPUs
    assert parse().model_threads == 3
    assert parse("--threads", "8").model_threads == 8  # told: as told


@pytest.mark.parametrize(
    "proc, files",
    [
        ("garbage\n\n0::/\n", {"cpu.max": "200000 100000\n"}),  # lines that are no cgroup's skipped
        ("0::/\n", {"cpu.max": "abc 100000\n"}),
        ("0::/\n", {"cpu.max": "100000 0\n"}),
        ("0::/\n", {"cpu.max": "100000\n"}),
        ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "x\n", "cpu/cpu.cfs_period_us": "100000\n"}),
        ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "0\n"}),
    ],
)
def test_files_not_in_the_kernels_format_never_stop_the_server(tmp_path, eight_cpus, proc, files):
    # the thread count is read as the server starts: a file it cannot parse means no limit it can tell
    root, proc_path = cgroup(tmp_path, proc, files)
    assert usable_cpus(root, proc_path) == (2 if proc.startswith("garbage") else 8)
