"""Ray, when installed (``pip install 'fmt-audit[ray]'``): a session on this machine or a cluster, and a scan's
layers tested by Ray workers in chunks.

Ray is optional and imported only here, only when used. With no address Ray
starts on this machine with the CPUs asked for and stops afterwards; with an
address (``auto``, ``ray://head:10001``) it joins that cluster. Tasks take one
CPU each, and their workers start with torch and ONNX Runtime kept to one thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from fmt_audit.errors import ConfigError, first_line
from fmt_audit.fmt.scan import LayerRunner, LayerWork, score_layers
from fmt_audit.model.graph import ConvLayer
from fmt_audit.report.json_report import LayerResult

INSTALL_HINT = "pip install 'fmt-audit[ray]'"


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, cpus: int | None = None) -> Iterator[str]:
    """Ray initialised for the block (a description of where it runs); started here, stopped here."""
    if not ray_available():
        raise ConfigError(f"Ray is not installed: {INSTALL_HINT}")
    if cpus is not None and cpus < 1:
        raise ConfigError(f"--workers must be at least 1; got {cpus}")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # Ray announces that it turned on token authentication for the cluster it starts: the
        # right default, and not the user's concern in a command's output
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        settings = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            ray.init(address=address, **settings) if address else ray.init(num_cpus=cpus, **settings)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise ConfigError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                              f"{first_line(error)}") from error
    try:
        total = int(ray.cluster_resources().get("CPU", 1))
        yield f"ray {ray.__version__}, {total} CPUs " + (f"in the cluster at {address}" if address
                                                        else "on this machine")
    finally:
        if started_here:
            ray.shutdown()


def _score_chunk(work: LayerWork, names: list[str]) -> list[LayerResult]:
    return score_layers(work, names)


def worker_environment(gpus: float = 0.0) -> dict[str, str]:
    """The environment a task's worker starts with: one thread (its task holds one CPU; torch reads
    ``OMP_NUM_THREADS`` at import, and so do our ONNX Runtime sessions), and no GPU unless the task reserved
    some (Ray leaves every GPU visible to a task that reserved none). Given to Ray as the task's
    ``runtime_env``, so Ray starts workers with it and no reused worker's environment is changed."""
    environment = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not gpus:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    return environment


def task_options(gpus_per_task: float = 0.0, max_memory: float | None = None) -> dict:
    """Ray's options for one task: one CPU, its GPUs, and, under ``--max-memory`` (MiB, each task's budget),
    that much memory reserved, so that Ray starts no more tasks on a node than the node's memory holds."""
    options = {"num_cpus": 1, "num_gpus": gpus_per_task, "max_retries": 0,
               "runtime_env": {"env_vars": worker_environment(gpus_per_task)}}
    if max_memory is not None:
        options["memory"] = int(max_memory * 2**20)
    return options


def check_resources(gpus_per_task: float, max_memory: float | None = None) -> None:
    """A task asking for more GPUs than the cluster has, or more memory than its largest node offers, would
    wait forever: refuse it now."""
    import ray

    if gpus_per_task < 0:
        raise ConfigError(f"--gpus-per-task must be 0 or more; got {gpus_per_task}")
    have = ray.cluster_resources().get("GPU", 0)
    if gpus_per_task > have:
        raise ConfigError(f"--gpus-per-task {gpus_per_task}: the Ray cluster has {have:g} GPUs")
    if max_memory is not None:
        largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")), default=0)
        if max_memory * 2**20 > largest:
            raise ConfigError(f"--max-memory {max_memory:g} MiB: each task reserves it, and the largest Ray node "
                              f"offers {largest / 2**20:.0f} MiB")


def node_cpus() -> int:
    """CPUs Ray schedules on the node this code runs on: as many one-CPU tasks may share its memory."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return max(1, int(node["Resources"].get("CPU", 1)))
    return os.cpu_count() or 1


def task_error(error: Exception) -> Exception:
    """What a failed Ray task raised, as this process would have raised it: the library's own errors as they
    were (one-line messages, exit 2), anything else as a ``RuntimeError`` naming its type."""
    from ray.exceptions import RayTaskError

    from fmt_audit.errors import FmtAuditError

    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    if isinstance(cause, FmtAuditError):
        return cause
    return RuntimeError(f"a Ray task failed: {type(cause).__name__}: {first_line(cause)}")


def chunks(layers: list[ConvLayer], count: int) -> list[list[ConvLayer]]:
    """``layers`` in at most ``count`` runs of consecutive layers with about equal numbers of channels."""
    total = sum(layer.out_channels for layer in layers)
    target = total / max(1, min(count, len(layers)))
    parts: list[list[ConvLayer]] = [[]]
    filled = 0
    for layer in layers:
        if parts[-1] and filled >= target * len(parts):
            parts.append([])
        parts[-1].append(layer)
        filled += layer.out_channels
    return parts


def ray_runner(address: str | None = None, workers: int | None = None, chunks_per_cpu: int = 2,
               gpus_per_task: float = 0.0) -> LayerRunner:
    """A :data:`fmt_audit.fmt.scan.LayerRunner` that tests chunks of layers as Ray tasks (``chunks_per_cpu``
    chunks per CPU of the cluster, so that the slow ones do not hold up the end)."""
    if address and workers is not None:
        raise ConfigError("--workers sizes Ray on this machine; a cluster (--address) has its own CPUs")
    if not ray_available():
        raise ConfigError(f"Ray is not installed: {INSTALL_HINT}")

    def run(work: LayerWork, layers: list[ConvLayer],
            progress: Callable[[str, int, int], None] | None) -> list[LayerResult]:
        import ray

        with ray_session(address, workers):
            check_resources(gpus_per_task, work.config.max_memory)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            task = ray.remote(**task_options(gpus_per_task, work.config.max_memory))(_score_chunk)
            shared = ray.put(work)
            parts = chunks(layers, cpus * chunks_per_cpu)
            pending = {task.remote(shared, [layer.name for layer in part]): number
                       for number, part in enumerate(parts)}
            results: dict[int, list[LayerResult]] = {}
            total, done = sum(layer.out_channels for layer in layers), 0
            if progress:        # the count begins (its clock too), before the first chunk comes back
                progress(layers[0].name, 0, total)
            try:
                while pending:
                    finished, _ = ray.wait(list(pending), num_returns=1)
                    number = pending.pop(finished[0])
                    try:
                        results[number] = ray.get(finished[0])
                    except Exception as error:  # the worker's error, as a local scan would have raised it
                        raise task_error(error) from None
                    done += sum(layer.out_channels for layer in parts[number])
                    if progress:
                        progress(parts[number][-1].name, done, total)
            finally:
                for ref in pending:     # one chunk failed: the others are not waited for
                    ray.cancel(ref)
        # where the layers were tested: a worker sees no GPU unless its task reserved some (worker_environment)
        run.device_used = "cuda" if gpus_per_task and work.config.device != "cpu" else "cpu"
        return [result for number in range(len(parts)) for result in results[number]]

    # chunk tasks side by side on a node share its memory (fmt_audit.fmt.scan.memory_plan). The plan is made here,
    # before Ray starts: on a cluster, nodes are taken to be like this machine; --max-memory instead gives
    # each task its budget, and Ray reserves it (task_options)
    run.memory_share = workers or os.cpu_count() or 1
    return run
