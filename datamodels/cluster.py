"""The Ray layer: long-lived actors that load the dataset once and run plain work functions.

No science here. A task is ``(key, fn, args, units)``; an actor calls ``fn(dataset, *args)``
and returns its small result. The driver keeps at most ``in_flight_per_worker`` tasks per actor
queued, replaces an actor that dies and resubmits its task (work functions are idempotent:
they skip rows already complete), and shows a progress bar in ``units`` (models).

Ray is started embedded (one actor per core, one torch thread each) unless an address is
given (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets), in which case the
driver joins that cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Hashable

import ray
from tqdm.auto import tqdm

from datamodels.config import DataConfig, ResourcesConfig, TrainConfig

__all__ = ["ensure_ray", "run_tasks", "shutdown_pool", "Worker", "default_workers"]

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at ``address``/``RAY_ADDRESS``, or start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def default_workers(resources: ResourcesConfig) -> int:
    total = ray.cluster_resources()
    if resources.workers is not None:
        return resources.workers
    if resources.gpus_per_worker > 0:
        return max(1, int(total.get("GPU", 0) / resources.gpus_per_worker))
    return max(1, int(total.get("CPU", 1) / resources.cpus_per_worker))


@ray.remote
class Worker:
    """Holds the dataset (loaded once, on this node) and runs work functions on it."""

    def __init__(self, data_cfg: DataConfig, threads: int, device: str):
        import torch

        from datamodels.data import load_dataset
        from datamodels.train import resolve_device

        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dataset = load_dataset(data_cfg)

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: Callable, *args) -> Any:
        return fn(self.dataset, *args)


def run_tasks(tasks: list[tuple[Hashable, Callable, tuple, int]], *, data_cfg: DataConfig,
              train_cfg: TrainConfig, resources: ResourcesConfig, address: str | None = None,
              progress: bool = True, unit: str = "models", desc: str = "",
              on_result: Callable[[Hashable, Any], None] | None = None) -> dict[Hashable, Any]:
    """Run every task on a pool of actors; return {key: result}.

    ``on_result(key, result)`` runs in the driver as each task finishes (e.g. to write results
    that the actors return instead of writing themselves, so an interrupted run keeps them).

    Raises RuntimeError when a task's actor died more than ``resources.max_retries`` times.
    On KeyboardInterrupt the actors are killed (rows in flight stay incomplete in the store)
    and the interrupt propagates.
    """
    ensure_ray(address)
    n_workers = max(1, min(default_workers(resources), len(tasks)))
    opts = {"num_cpus": resources.cpus_per_worker, "num_gpus": resources.gpus_per_worker, "max_restarts": 0}

    def new_actor():
        return Worker.options(**opts).remote(data_cfg, train_cfg.threads, train_cfg.device)

    actors = _pool(new_actor, n_workers, (data_cfg, train_cfg.threads, train_cfg.device,
                                          resources.cpus_per_worker, resources.gpus_per_worker))
    pending = list(reversed(tasks))  # pop() from the end keeps submission order
    attempts: dict[Hashable, int] = {}
    in_flight: dict[ray.ObjectRef, tuple[int, tuple]] = {}  # ref -> (actor slot, task)
    load = [0] * n_workers
    results: dict[Hashable, Any] = {}
    total_units = sum(t[3] for t in tasks)
    bar = tqdm(total=total_units, unit=unit, desc=desc, disable=not progress, smoothing=0.1)

    def submit():
        while pending:
            slot = min(range(n_workers), key=lambda s: load[s])
            if load[slot] >= resources.in_flight_per_worker:
                return
            task = pending.pop()
            key, fn, args, _ = task
            in_flight[actors[slot].run.remote(fn, *args)] = (slot, task)
            load[slot] += 1

    try:
        submit()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            slot, task = in_flight.pop(ref)
            load[slot] -= 1
            key = task[0]
            try:
                results[key] = ray.get(ref)
                if on_result is not None:
                    on_result(key, results[key])
                bar.update(task[3])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] > resources.max_retries:
                    raise RuntimeError(
                        f"task {key} failed {attempts[key]} times (its worker died each time); last: {e}"
                    ) from e
                log.warning("worker died running %s (%s); retrying (attempt %d)", key,
                            type(e).__name__, attempts[key] + 1)
                # Tasks queued on the same dead actor fail too and are requeued as they arrive.
                if not _alive(actors[slot]):
                    actors[slot] = new_actor()
                pending.append(task)
            submit()
    except BaseException:
        shutdown_pool()
        raise
    finally:
        bar.close()
    return results


# One pool of warm actors per driver process: the stages of a pipeline (train, evaluate,
# full-set models, verification) reuse them instead of paying actor start and data loading
# each time. Keyed by what the actors hold, and by the Ray session they live in.
_POOL: dict = {"key": None, "actors": []}


def _pool(new_actor: Callable, n: int, key: tuple) -> list:
    key = (ray.get_runtime_context().get_job_id(), key)
    if _POOL["key"] != key:
        shutdown_pool()
        _POOL["key"] = key
    actors = _POOL["actors"]
    actors[:] = [a for a in actors if _alive(a, timeout=5)]
    while len(actors) < n:
        actors.append(new_actor())
    return actors  # slots replaced on failure are replaced in the pool too


def shutdown_pool() -> None:
    """Kill the warm actors (they hold CPU/GPU reservations)."""
    for a in _POOL["actors"]:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    _POOL["actors"] = []
    _POOL["key"] = None


def _alive(actor, timeout: float = 30) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=timeout)
        return True
    except Exception:
        return False
