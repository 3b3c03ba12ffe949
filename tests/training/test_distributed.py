"""Training spread over devices and workers: the strategies of ``medseg train``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.training.runtime import cluster_environment, device_names
from tests.conftest import SAMPLE
from tests.training.test_training import TINY_TRAIN, _history, _train_command

#: Trains in a process whose CPU is split into two logical devices (as a machine
#: with two GPUs has two), with the strategy and devices of its arguments.
TWO_CPUS = """\
import json, logging, sys
from dataclasses import replace

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
from medseg.config import load_config
from medseg.training.trainer import train

logging.basicConfig(format="%(message)s")
logging.getLogger("medseg").setLevel(logging.INFO)
config, data, output, strategy, devices = sys.argv[1:]
config = load_config(config)
config = config.replace(data=replace(config.data, dataset=data))
train(config, output, verbose=0, strategy=strategy, devices=json.loads(devices))
"""


def _train_on_two_cpus(config, output, strategy, devices):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            TWO_CPUS,
            str(config),
            str(SAMPLE),
            str(output),
            strategy,
            json.dumps(devices),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _deeper(config: str) -> str:
    """TINY_TRAIN's network one level deeper, with a deep-supervision output."""
    return config.replace("[4, 8]", "[4, 8, 16]").replace(
        "  spatial_dims: 3\n", "  spatial_dims: 3\n  deep_supervision: 1\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("deep", [False, True], ids=["plain", "deep_supervision"])
def test_mirrored_over_two_devices_trains_as_one_device(tmp_path, deep):
    # the same global batch of 2 and seed: one device takes both patches, each of
    # two replicas one, and the all-reduced gradient is the same
    config = tmp_path / "tiny.yaml"
    text = TINY_TRAIN.format(epochs=2, steps=3)
    config.write_text(_deeper(text) if deep else text)
    one = tmp_path / "one"
    two = tmp_path / "two"
    _train_on_two_cpus(config, one, "none", ["/cpu:0"])
    log = _train_on_two_cpus(config, two, "mirrored", ["/cpu:0", "/cpu:1"])
    assert "MirroredStrategy: 2 replicas" in log
    rows = {run: _history(run / "history.csv") for run in (one, two)}
    for key in ("loss", "dice_1", "val_dice_mean"):
        a = [float(r[key]) for r in rows[one]]
        b = [float(r[key]) for r in rows[two]]
        assert len(a) == 2 and np.allclose(a, b, rtol=1e-4, atol=1e-5), (key, a, b)
    assert float(rows[one][0]["loss"]) != float(rows[one][1]["loss"])  # it trained


def test_device_names():
    assert device_names(["0", 1, "/cpu:0", "gpu:2", "/device:GPU:3"]) == [
        "/gpu:0",
        "/gpu:1",
        "/cpu:0",
        "/gpu:2",
        "/device:GPU:3",
    ]
    with pytest.raises(ConfigError, match=r"device 'tpu0': expected a GPU number"):
        device_names(["tpu0"])


SLURM_STEP = {
    "SLURM_PROCID": "3",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "node[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "MEDSEG_SLURM_PORT": "23456",
}


def test_a_slurm_job_step_of_cpu_tasks_is_a_cluster(monkeypatch):
    from medseg.training.runtime import cluster_resolver

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert cluster_environment() == "slurm"
    resolver = cluster_resolver()
    # two tasks a node, their ports from MEDSEG_SLURM_PORT up; the fourth task is
    # the second worker of the second node
    assert resolver.cluster_spec().as_dict() == {
        "worker": [
            "node07:23456",
            "node07:23457",
            "node08:23456",
            "node08:23457",
        ]
    }
    assert (resolver.task_type, resolver.task_id) == ("worker", 3)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # CPU nodes: untouched
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: not a cluster
    assert cluster_environment() is None
    with pytest.raises(ConfigError, match="strategy multiworker needs a cluster"):
        cluster_resolver()


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(config, run, environments, *extra):
    return [
        subprocess.Popen(
            _train_command(config, run, *extra),
            env={**os.environ, **environment},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for environment in environments
    ]


def _finish(processes, timeout=420):
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    return outputs


@pytest.mark.slow
def test_two_workers_train_deep_supervision_to_a_budget_on_loopback(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(_deeper(TINY_TRAIN.format(epochs=1, steps=2)))
    run = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    outputs = _finish(
        _start_workers(
            config,
            run,
            [
                {
                    "TF_CONFIG": json.dumps(
                        {"cluster": cluster, "task": {"type": "worker", "index": i}}
                    )
                }
                for i in range(2)
            ],
            "--time-budget",
            "30s",
        )
    )
    assert "MultiWorkerMirroredStrategy: worker 0 of 2 workers" in outputs[0]
    rows = _history(run / "history.csv")
    # the budget, not train.epochs, ended the run: after the epoch that spent it
    # on the slowest worker's clock (the chief's own, logged here, may be behind)
    assert len(rows) >= 2 and float(rows[-1]["elapsed"]) >= 30 - 2
    assert float(rows[-2]["elapsed"]) < 30
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    from medseg import bundle

    metadata = bundle.verify(run)
    # the bundle holds the best validated epoch (the budget's last is validated)
    scored = [r for r in rows if r.get("val_dice_mean")]
    assert scored[-1] is rows[-1]
    best = max(scored, key=lambda r: float(r["val_dice_mean"]))  # the first best
    assert metadata["split"]["train"] and metadata["epoch"] == int(best["epoch"])
    # the second worker wrote only into its own scratch folder
    assert (run / ".worker-1" / "history.csv").is_file()
    import tensorflow as tf

    (events,) = (run / "tensorboard" / "train").iterdir()  # the chief logs
    logged = [
        (value.tag, event.step, value)
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    ]
    losses = [tf.make_ndarray(v.tensor) for tag, _, v in logged if tag == "epoch_loss"]
    assert np.allclose(losses, [float(r["loss"]) for r in rows])


@pytest.mark.slow
def test_two_slurm_tasks_resume_after_one_is_killed(tmp_path):
    # a Slurm job step of two tasks on one node (loopback): one task is killed after
    # the first epoch, the step is started again with --resume and finishes
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN.format(epochs=3, steps=4))
    run = tmp_path / "run"
    step = {
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "MEDSEG_SLURM_PORT": str(_free_ports(1)[0]),
        "TF_CONFIG": "",
    }
    tasks = [{**step, "SLURM_PROCID": str(i)} for i in range(2)]
    processes = _start_workers(config, run, tasks, "--resume")
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and processes[1].poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert processes[1].poll() is None, processes[1].communicate()[0][-3000:]
    os.killpg(processes[1].pid, signal.SIGKILL)  # the node of task 1 is lost
    try:  # the other cannot go on alone: its collective ops fail or wait
        processes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(processes[0].pid, signal.SIGKILL)
    epochs = [int(r["epoch"]) for r in _history(run / "history.csv")]
    assert epochs and epochs[-1] < 3
    outputs = _finish(_start_workers(config, run, tasks, "--resume"))
    assert "worker 1 of 2 workers" in outputs[1]
    rows = _history(run / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    from medseg import bundle

    assert bundle.verify(run)["epoch"] == 3
