"""The Ray layer: connect, an elastic pool of warm actors, and one-off remote calls. No science.

**Connecting.** Without an address, an embedded local Ray is started (one worker per core).
With ``--address`` or ``RAY_ADDRESS`` (which ``ray job submit`` sets) the driver joins that
cluster -- after checking, in seconds, that the address answers at all, and presenting Ray's
authentication token when one is available (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``): a cluster started with ``ray start`` after an embedded run requires it.

**The pool.** The driver ships the dataset once through Ray's object store (no node needs a
copy on disk) to long-lived actors that call plain work functions ``fn(dataset, *args)`` and
return their results; the driver writes them. The pool

- grows while work is queued and resources are free (and asks an autoscaler for more with
  ``request_resources``, so a cluster scaling from zero gets its nodes),
- shrinks when actors or nodes die: their tasks go back to the queue for live actors,
- hands work only to actors that have started, never to one still waiting for a node,
- gives up with :class:`~datamodels.errors.ClusterError` naming the missing resources when no
  actor can run for ``resources.wait_timeout`` seconds,
- ends with a clear error, in seconds, when the embedded Ray's raylet dies.

Actors stay warm between the stages of a pipeline (train, evaluate, full-set models, verify).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import ray
from tqdm.auto import tqdm

from datamodels.errors import ClusterError, DatamodelsError

__all__ = ["connect", "Task", "Pool", "run_remote", "shutdown_pool", "worker_shape"]

log = logging.getLogger(__name__)

_ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
               ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
_EMBEDDED: dict[str, Any] = {"raylet": None}


# --------------------------------------------------------------------------- connecting


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def _reachable(address: str) -> None:
    """Raise ClusterError at once when ``host:port`` does not accept connections."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected HOST:PORT of a Ray head (e.g. 10.0.0.1:6379), "
                           "'auto', or unset to start a local Ray")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with "
                           f"`ray start --head --port={port}` or fix --address / RAY_ADDRESS") from None


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray.

    Raises ClusterError (one line) when the cluster cannot be reached or refuses the driver.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            _EMBEDDED["raylet"] = ray._private.worker._global_node.all_processes["raylet"][0].process
        except Exception:  # an internal Ray detail; without it we only lose the fast raylet check
            _EMBEDDED["raylet"] = None
        return
    _reachable(address)
    _authenticate(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError from the GCS client
        text = f"{type(e).__name__}: {e}"
        if "Authentication" in text or "InvalidAuthToken" in text:
            raise _auth_error(address) from None
        raise ClusterError(f"could not join the Ray cluster at {address}: {text.splitlines()[0]}") from None


def _auth_error(address: str) -> ClusterError:
    return ClusterError(
        f"the Ray cluster at {address} uses token authentication and this driver has no matching token: copy "
        "the head node's token (`ray get-auth-token` there) to ~/.ray/auth_token or RAY_AUTH_TOKEN here and "
        "export RAY_AUTH_MODE=token, or start the cluster with RAY_AUTH_MODE=disabled")


def _authenticate(address: str) -> None:
    """Ask the cluster's GCS, in milliseconds, whether it wants Ray's token: a cluster started
    with ``ray start`` after any local Ray run does, and a driver joining it sends the token
    only in token mode. Switch to token mode when a token is at hand; else fail in one line."""
    try:
        from ray._raylet import GcsClient  # Ray's own GCS client (internal): the probe is optional
    except ImportError:
        return

    def refused() -> bool:
        try:
            GcsClient(address=address, cluster_id=None)
            return False
        except Exception as e:
            return "Authentication" in f"{type(e).__name__}: {e}"

    if address in ("auto", "local") or "://" in address or not refused():
        return
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            from ray._raylet import Config

            Config.initialize("")  # make this process see the new mode (as Ray's own setup does)
        except Exception:
            pass
        if not refused():
            log.info("the Ray cluster at %s uses token authentication; joining with this machine's token", address)
            return
    raise _auth_error(address)


def _check_local_ray() -> None:
    proc = _EMBEDDED.get("raylet")
    if proc is not None and proc.poll() is not None:
        _EMBEDDED["raylet"] = None
        raise ClusterError(
            f"the local Ray started by this command lost its raylet (pid {proc.pid} exited with {proc.returncode}: "
            "killed, or out of memory); everything written so far is kept: re-run the same command to continue")


# --------------------------------------------------------------------------- resources


def worker_shape(resources) -> dict[str, float]:
    """Ray resources one training actor asks for (from a ResourcesConfig)."""
    need = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker > 0:
        need["GPU"] = float(resources.gpus_per_worker)
    return need


def _fits(avail: dict[str, float], need: dict[str, float]) -> int:
    return min((math.floor(avail.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0), default=1 << 30)


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _alive_nodes() -> dict[str, dict[str, float]]:
    """{node id: total resources} of the nodes Ray considers alive."""
    out = {}
    for n in ray.nodes():
        if n.get("Alive"):
            out[n["NodeID"]] = {k: v for k, v in n.get("Resources", {}).items()
                                if k in ("CPU", "GPU", "memory") or not k.startswith(("node:", "object_store"))}
    return out


def _unschedulable(need: dict[str, float], waited: float, what: str) -> ClusterError:
    nodes = _alive_nodes()
    able = [r for r in nodes.values() if _fits(r, need) >= 1]
    keys = ", ".join(f"{k}" for k in need)
    if not able:
        offered = "; ".join(_fmt({k: r.get(k, 0.0) for k in need}) for r in nodes.values()) or "none"
        missing = sorted({k for k in need if all(r.get(k, 0.0) < need[k] for r in nodes.values())})
        return ClusterError(
            f"no {what} could start for {waited:.0f} s (resources.wait_timeout): each needs {_fmt(need)} and no "
            f"alive node has that ({len(nodes)} alive, offering {offered}; short of {', '.join(missing) or keys}); "
            f"add such nodes or lower the request (resources.*)")
    return ClusterError(
        f"no {what} could start for {waited:.0f} s (resources.wait_timeout): each needs {_fmt(need)}; "
        f"{len(able)} node(s) could host one but their resources are held by other work")


# --------------------------------------------------------------------------- actors


@ray.remote
class Worker:
    """Holds the dataset and runs work functions on it."""

    def __init__(self, dataset, threads: int, device: str):
        import torch

        from datamodels.train import resolve_device

        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dataset = dataset

    def info(self) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def run(self, fn: Callable, *args) -> Any:
        return fn(self.dataset, *args)


@dataclass
class _Actor:
    handle: Any
    ready: Any  # ObjectRef of info(), until the actor has started
    node: str | None = None
    pid: int | None = None
    busy: int = 0

    @property
    def live(self) -> bool:
        return self.ready is None


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(dataset, *args)`` on an actor; ``units`` for the progress bar."""

    key: Hashable
    fn: Callable
    args: tuple
    units: int = 1


@dataclass
class PoolReport:
    """What a :meth:`Pool.run` did: tasks retried after an actor died, units done per node."""

    retried: int = 0
    by_node: Counter = field(default_factory=Counter)


# One pool of warm actors per driver process, keyed by what the actors hold and by the Ray
# session they live in: the stages of a pipeline reuse them.
_POOL: dict[str, Any] = {"key": None, "pool": None}


class Pool:
    """An elastic pool of :class:`Worker` actors (see the module docstring)."""

    def __init__(self, dataset, *, threads: int, device: str, resources):
        self.resources = resources
        self.need = worker_shape(resources)
        self.max_workers = resources.workers or (1 << 30)
        self.threads, self.device = threads, device
        self.dataset_ref = ray.put(dataset)
        self.actors: list[_Actor] = []
        self._requested = 0
        self._nodes_checked = 0.0

    @classmethod
    def get(cls, dataset, *, threads: int, device: str, resources) -> "Pool":
        """The warm pool for this dataset and actor shape, created on first use."""
        ctx = ray.get_runtime_context()  # job ids repeat across Ray sessions; the driver's node id does not
        key = (ctx.get_node_id(), ctx.get_job_id(), dataset.fingerprint(), threads, device,
               tuple(sorted(worker_shape(resources).items())))
        pool = _POOL["pool"]
        if _POOL["key"] != key or pool is None:
            shutdown_pool()
            pool = cls(dataset, threads=threads, device=device, resources=resources)
            _POOL.update(key=key, pool=pool)
        pool.resources = resources
        pool.max_workers = resources.workers or (1 << 30)
        return pool

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> None:
        opts = {"max_restarts": 0}
        opts["num_cpus"] = self.need["CPU"]
        opts["num_gpus"] = self.need.get("GPU", 0)
        h = Worker.options(**opts).remote(self.dataset_ref, self.threads, self.device)
        self.actors.append(_Actor(h, h.info.remote()))

    def _drop(self, actor: _Actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass

    def _prune_dead_nodes(self) -> None:
        """Forget actors on nodes Ray has declared dead (checked every few seconds)."""
        now = time.monotonic()
        if now - self._nodes_checked < 3:
            return
        self._nodes_checked = now
        alive = set(_alive_nodes())
        for a in [a for a in self.actors if a.node is not None and a.node not in alive]:
            log.warning("node %s is gone; its worker (pid %s) is dropped", a.node[:8], a.pid)
            self._drop(a)

    def _scale(self, want: int) -> None:
        """Start workers while ``want`` exceed the actors and resources are free; ask an
        autoscaler (if the cluster has one) for room for ``want`` workers in all."""
        want = min(want, self.max_workers)
        if len(self.actors) < want:
            pending = sum(not a.live for a in self.actors)
            free = _fits(ray.available_resources(), self.need) - pending
            for _ in range(max(0, min(want - len(self.actors), free))):
                self._new_actor()
        if want != self._requested:
            self._request(want)

    def _request(self, n: int) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[dict(self.need)] * n)
            self._requested = n
        except Exception as e:  # no autoscaler API on this cluster: nothing to ask
            log.debug("request_resources: %s", e)

    # ------------------------------------------------------------------ running
    def run(self, tasks: list[Task], on_result: Callable[[Task, Any], None], *, progress: bool = True,
            desc: str = "", unit: str = "models") -> PoolReport:
        """Run every task; call ``on_result(task, result)`` in the driver as each one returns.

        Raises ClusterError when a task's actor died more than ``resources.max_retries`` times,
        when nothing could run for ``resources.wait_timeout`` seconds, or when the embedded
        Ray died; re-raises a work function's own DatamodelsError. On any exception (Ctrl-C
        too) the actors are killed; results already handed to ``on_result`` are kept.
        """
        queue = deque(tasks)
        inflight: dict[Any, tuple[_Actor, Task]] = {}
        attempts: Counter = Counter()
        report = PoolReport()
        bar = tqdm(total=sum(t.units for t in tasks), unit=unit, desc=desc, disable=not progress, smoothing=0.1)
        stalled_since = time.monotonic()
        try:
            while queue or inflight:
                _check_local_ray()
                self._prune_dead_nodes()
                self._scale(len(queue) + len(inflight))
                for a in sorted((a for a in self.actors if a.live), key=lambda a: a.busy):
                    while queue and a.busy < self.resources.in_flight_per_worker:
                        task = queue.popleft()
                        inflight[a.handle.run.remote(task.fn, *task.args)] = (a, task)
                        a.busy += 1
                waiting = list(inflight) + [a.ready for a in self.actors if not a.live]
                if any(a.live for a in self.actors):
                    stalled_since = time.monotonic()
                elif time.monotonic() - stalled_since > self.resources.wait_timeout:
                    raise _unschedulable(self.need, time.monotonic() - stalled_since, "worker")
                if not waiting:
                    time.sleep(0.5)
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in inflight:
                        self._finish(ref, inflight, queue, attempts, report, on_result, bar)
                    else:
                        self._started(ref)
        except BaseException:
            shutdown_pool()
            raise
        finally:
            bar.close()
            if self._requested:
                self._request(0)
        return report

    def _started(self, ref) -> None:
        actor = next(a for a in self.actors if a.ready == ref)
        try:
            actor.node, actor.pid = ray.get(ref)
            actor.ready = None
        except _ACTOR_DIED as e:
            self._drop(actor)
            if getattr(e, "actor_init_failed", False):
                raise ClusterError(f"a worker could not start: {_cause(e)}") from None
            log.warning("a worker died while starting (%s: %s); another will be started", type(e).__name__, _cause(e))

    def _finish(self, ref, inflight, queue, attempts, report, on_result, bar) -> None:
        actor, task = inflight.pop(ref)
        actor.busy -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
            if isinstance(cause, DatamodelsError):
                raise cause from None
            raise ClusterError(f"work unit {task.key} failed on node {(actor.node or '?')[:8]}: {_cause(e)}") from None
        except _ACTOR_DIED as e:
            attempts[task.key] += 1
            self._drop(actor)
            if attempts[task.key] > self.resources.max_retries:
                raise ClusterError(
                    f"work unit {task.key} failed {attempts[task.key]} times: its worker died each time "
                    f"(last: {type(e).__name__} on node {(actor.node or '?')[:8]}); resources.max_retries="
                    f"{self.resources.max_retries}. Check the workers' memory (OOM kills) and node health, "
                    "then re-run: finished models are kept") from None
            log.warning("worker (pid %s) died running %s (%s); queued again (attempt %d)", actor.pid, task.key,
                        type(e).__name__, attempts[task.key] + 1)
            report.retried += 1
            queue.appendleft(task)
            return
        on_result(task, result)
        report.by_node[actor.node] += task.units
        bar.update(task.units)


def _cause(e: BaseException) -> str:
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def shutdown_pool() -> None:
    """Kill the warm actors (they hold CPU/GPU reservations)."""
    pool = _POOL.get("pool")
    if pool is not None:
        for a in list(pool.actors):
            pool._drop(a)
    _POOL.update(key=None, pool=None)


# --------------------------------------------------------------------------- one-off calls


@ray.remote
class _Runner:
    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def call(self, fn: Callable, *args) -> Any:
        return fn(*args)


def run_remote(fn: Callable, *args, cpus: float = 1.0, gpus: float = 0.0, memory_gb: float | None = None,
               wait_timeout: float = 300.0, what: str = "task") -> Any:
    """Run ``fn(*args)`` once on a cluster node with the resources asked for; return its result.

    The warm training pool is released first (its actors may hold the GPUs this needs).
    Raises ClusterError when nothing can host it for ``wait_timeout`` seconds or its node dies.
    """
    shutdown_pool()
    need = {"CPU": float(cpus)}
    if gpus:
        need["GPU"] = float(gpus)
    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0}
    if memory_gb:
        opts["memory"] = int(memory_gb * 2**30)
        need["memory"] = float(opts["memory"])
    runner = _Runner.options(**opts).remote()
    try:
        start = time.monotonic()
        ready = runner.ready.remote()
        while not ray.wait([ready], timeout=1.0)[0]:
            _check_local_ray()
            if time.monotonic() - start > wait_timeout:
                raise _unschedulable(need, time.monotonic() - start, what)
        try:
            node = ray.get(ready)
        except _ACTOR_DIED as e:
            raise ClusterError(f"the {what} could not start: {_cause(e)}") from None
        log.info("%s runs on node %s", what, node[:8])
        ref = runner.call.remote(fn, *args)
        while not ray.wait([ref], timeout=1.0)[0]:
            _check_local_ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, DatamodelsError):
                raise cause from None
            raise ClusterError(f"the {what} failed on node {node[:8]}: {_cause(e)}") from None
        except _ACTOR_DIED as e:
            raise ClusterError(f"the {what}'s node died ({type(e).__name__}); re-run to try again") from None
    finally:
        try:
            ray.kill(runner, no_restart=True)
        except Exception:
            pass
