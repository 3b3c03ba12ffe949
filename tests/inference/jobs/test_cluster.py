"""``medseg predict --scheduler``: the cases of a run on a Dask cluster's workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SAMPLE, run_medseg

distributed = pytest.importorskip("distributed")

SCANS = SAMPLE / "imagesTr"


def _predict(output, *extra):
    return [
        sys.executable, "-m", "medseg_cli", "predict", "--model", "hippocampus",
        "--input", str(SCANS), "--output", str(output), *extra,
    ]  # fmt: skip


def _same_run(local, remote, rerun=False) -> None:
    """The label maps byte for byte, the volumes table, and the report but for the
    seconds each case took (with ``rerun``, but for the cases that a dead worker
    wrote and its task's second run then found done: reported skipped)."""
    maps = sorted(p.name for p in local.glob("*.nii.gz"))
    assert len(maps) == 12 and maps == sorted(p.name for p in remote.glob("*.nii.gz"))
    for name in maps:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    table = "medseg_volumes.csv"
    expected, got = ((f / table).read_text().splitlines() for f in (local, remote))
    if not rerun:
        assert got == expected
    else:
        # a case its dead worker wrote is measured again from its files; its
        # out-of-distribution scores went with the worker (the last two columns)
        assert expected[0].endswith(",ood_intensity,ood_features")
        assert [r.rsplit(",", 2)[0] for r in got] == [
            r.rsplit(",", 2)[0] for r in expected
        ]
        assert all(
            r == e or r.endswith(",,") for r, e in zip(got, expected, strict=True)
        )

    def cases(folder):
        report = json.loads((folder / "medseg_predict_report.json").read_text())
        return [
            {k: v for k, v in case.items() if k not in ("seconds", "output")}
            for case in report["cases"]
        ]

    if not rerun:
        assert cases(local) == cases(remote)
    else:
        found = cases(remote)
        assert [c["input"] for c in found] == [c["input"] for c in cases(local)]
        assert all(c["status"] in ("done", "skipped") for c in found)
    assert not list(remote.glob(".*"))  # no partial file, no scan left in hand


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("local") / "out"
    result = subprocess.run(_predict(output), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow
def test_a_local_cluster_writes_what_a_local_run_writes(local_run, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        _predict(output, "--scheduler", "local:2"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 segmented, 0 skipped (output existed), 0 failed" in result.stdout
    _same_run(local_run, output)
    # one worker a GPU (here none: each worker computes on the CPU), all redone
    again = subprocess.run(
        _predict(output, "--devices", "0,1", "--overwrite"),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "12 segmented, 0 skipped (output existed), 0 failed" in again.stdout
    _same_run(local_run, output)


def test_devices_give_each_worker_its_own_gpu():
    from medseg.inference.jobs.cluster import WORKER_THREADS, connect

    with connect(None, ("0", "1")) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = client.run(lambda: os.environ.get(WORKER_THREADS))
    assert sorted(seen.values()) == ["0", "1"]
    cores = len(os.sched_getaffinity(0))
    assert set(threads.values()) == {str(max(1, cores // 2))}


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_no_case(local_run, tmp_path):
    from distributed import Client, LocalCluster

    output = tmp_path / "out"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        process = subprocess.Popen(
            _predict(output, "--scheduler", cluster.scheduler_address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if list(output.glob("*.nii.gz")):  # the workers are segmenting
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1][-3000:]
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert victim not in client.run(os.getpid).values()  # it was gone
    assert "0 failed" in stdout
    _same_run(local_run, output, rerun=True)


def test_local_needs_a_number_of_workers(tmp_path):
    from medseg.errors import InputFileError
    from medseg.inference.jobs.cluster import connect

    with pytest.raises(InputFileError, match="local:N takes a positive number"):
        with connect("local:0"):
            pass
    with pytest.raises(InputFileError, match="--devices takes GPU numbers"):
        with connect(None, ("/gpu:0",)):
            pass
    result = run_medseg(
        "predict", "--model", "hippocampus", "--input", SCANS, "--output",
        tmp_path / "o", "--scheduler", "local:x",
    )  # fmt: skip
    assert result.returncode == 2
    assert "local:x: local:N takes a positive number of workers" in result.stderr
