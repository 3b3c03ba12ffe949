"""Segmenting a run's cases on a Dask cluster (``medseg predict --scheduler``).

The command's own process plans the run, checks the folder's settings record, skips
what is done and writes the report and the volumes table, as a local run does; each
case is a task that a worker runs as a local run runs one case (read, segment, write
its files atomically, mark it in hand meanwhile), with the segmenter each worker
process loads once and keeps. Dask runs a task again elsewhere when its worker dies;
a case that was written before its worker died is then found done, not written
twice. A case whose every worker died (Dask's ``allowed-failures``, 3 by default) is
reported failed, the others go on. Needs ``pip install "medseg[dask]"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from medseg.errors import InputFileError
from medseg.inference.jobs.run import _fail, _Job
from medseg.inference.jobs.tables import CaseResult

#: A worker process's intra-op threads (``local:N`` sets it to the cores / N, so
#: that N workers do not each take every core); unset: TensorFlow's default.
WORKER_THREADS = "MEDSEG_WORKER_THREADS"

#: The segmenter of this worker process, by the bundles and options it was made for.
_loaded: dict = {}


@contextlib.contextmanager
def connect(scheduler: str | None, devices: tuple[str, ...] = ()) -> Iterator:
    """A ``dask.distributed`` client: of ``scheduler``, a scheduler's address
    (``tcp://host:8786``), or ``local:N`` for N worker processes on this machine; or,
    with ``devices`` (GPU numbers), of one worker process per GPU of this machine,
    each seeing only its own (``CUDA_VISIBLE_DEVICES``). A local cluster is closed
    with the client.

    Raises:
        InputFileError: dask.distributed is not installed, ``local:N`` is not a
            positive number of workers, or devices that are not GPU numbers.
    """
    what = scheduler or "--devices " + ",".join(devices)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputFileError(
            what, 'needs dask.distributed: pip install "medseg[dask]"'
        ) from None
    if scheduler and not scheduler.startswith("local:"):
        with Client(scheduler) as client:
            yield client
        return
    # the workers' comings and goings are not the run's news
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if devices:
        with _one_worker_a_gpu(devices, what) as cluster, Client(cluster) as client:
            yield client
        return
    count = scheduler.removeprefix("local:")
    if not count.isdigit() or int(count) < 1:
        raise InputFileError(scheduler, "local:N takes a positive number of workers")
    workers = int(count)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={WORKER_THREADS: str(_threads(workers))},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _threads(workers: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _one_worker_a_gpu(devices: tuple[str, ...], what: str):
    """A local cluster of one worker process per GPU number in ``devices``."""
    from distributed import Nanny, Scheduler, SpecCluster

    if not devices or not all(d.strip().isdigit() for d in devices):
        raise InputFileError(what, "--devices takes GPU numbers, such as 0,1")
    threads = str(_threads(len(devices)))
    workers = {
        f"gpu-{d.strip()}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": {"CUDA_VISIBLE_DEVICES": d.strip(), WORKER_THREADS: threads},
            },
        }
        for d in devices
    }
    return SpecCluster(
        workers=workers,
        scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
    )


def on_cluster(client, run) -> Callable[[list], Iterator[CaseResult]]:
    """The function :func:`~medseg.inference.jobs.run.segment_all` calls with the
    cases to do, ``[(input, label map)]``: it sends each case of ``run`` (a
    :class:`~medseg.inference.jobs.predict.SegmentationRun`) to the cluster and
    yields their results as they finish. The workers use the precision this
    process chose (``auto`` resolved here, as the folder's settings record it)."""
    from distributed import as_completed

    members = getattr(run.segmenter, "members", [run.segmenter])
    options = replace(run.plan.options, precision=members[0].precision)
    plan, beside = replace(run.plan, options=options), run.beside

    def segment(todo) -> Iterator[CaseResult]:
        futures = {
            client.submit(
                _segment_case, _case_plan(plan, path), beside, path, target, pure=False
            ): (path, target)
            for path, target in todo
        }
        for future in as_completed(futures):
            path, target = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # the case's task failed, not one step of it
                yield _task_failed(path, target, exc)
            finally:
                future.release()

    return segment


def _case_plan(plan, path: Path):
    """``plan`` with what one case's task needs of it (not every case's list)."""
    own = {path: plan.groups[path]} if path in plan.groups else {}
    name = {path: plan.names[path]} if path in plan.names else {}
    return replace(plan, everything=[], inputs=[path], groups=own, names=name)


def _task_failed(path: Path, target: Path, exc: Exception) -> CaseResult:
    from distributed import KilledWorker

    result = CaseResult(str(path), str(target), "failed")
    if isinstance(exc, KilledWorker):
        result.error = (
            f"{path}: every worker that segmented it died (killed for memory, or a "
            "crash?); not tried again"
        )
        return result
    _fail(result, path, exc)
    return result


def _segment_case(plan, beside, path: Path, target: Path) -> CaseResult:
    """One case on a worker, as a local run does it (see ``_Job.segment_each``)."""
    segmenter = _worker_segmenter(plan)
    job = _Job(
        segment=segmenter.predict,
        output_dir=plan.output_dir,
        overwrite=plan.options.overwrite,
        progress=None,
        rename=plan.names,
        beside=beside,
        reader=plan.reader(),
        groups=plan.groups,
        wait_for_others=False,
    )
    job.segment_each([(path, target)], suspects=set())
    (result,) = job.results
    return result


def _worker_segmenter(plan):
    """The plan's segmenter, loaded once in this worker process."""
    key = (tuple(str(b) for b in plan.models.bundles), plan.options)
    if key not in _loaded:
        threads = os.environ.get(WORKER_THREADS)
        if threads and not _loaded:
            import tensorflow as tf

            with contextlib.suppress(RuntimeError):  # TensorFlow started already
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        from medseg.inference.jobs.predict import load_segmenter

        _loaded.clear()  # one model at a time
        _loaded[key] = load_segmenter(plan)
    return _loaded[key]
