"""``bilalora run --ray``: dehaze image folders and videos across a Ray cluster. Torch-free.

    from bilalora.runtime.manifest import Job
    from bilalora.runtime.ray import FleetOptions, run_fleet
    record = run_fleet([Job("flight.mp4", "clean.mp4")], "export/", FleetOptions(address="auto"))

Each worker is a Ray actor holding a few :class:`~.dehazer.Dehazer` s (least
recently used dropped first), so a model is loaded once per worker, not once per
task; a worker asks Ray for a GPU when the model is a TensorRT engine (or the
onnxruntime has CUDA) and the cluster has GPUs. Work items
(:mod:`.chunks`, :mod:`.fleet`) go to the workers two at a time each, preferring a
worker that already holds the item's model. A worker that dies (killed, out of
memory, node lost) is restarted by Ray and its unfinished items run again
(``max_restarts`` / ``max_task_retries``): image files are written atomically by the
workers, video frames come back to this process, which appends them in order to the
output video, so a retried item never leaves half a file or a duplicate frame.

Paths go to the workers as absolute paths: on a multi-node cluster the inputs (and
image outputs) must be on storage every node sees (NFS, a mounted bucket); output
videos are written by this process.

Needs ``ray`` (``pip install 'bilalora[ray]'``), imported on first use.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from bilalora.errors import UserError

from .chunks import WorkItem, frame_name, iter_video_range
from .fleet import JobState, plan_job
from .manifest import Job, file_digest, model_key

__all__ = ["FleetOptions", "FleetWorker", "run_fleet", "import_ray"]

_PIXEL_OPTIONS = ("prefer", "precision", "providers", "tile", "overlap", "color")


def import_ray():
    """The ``ray`` module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'bilalora[ray]'") from None
    return ray


@dataclass
class FleetOptions:
    """How to spread a run.

    Attributes:
        address: None (``$RAY_ADDRESS`` when set, else a new local cluster), "auto" (the cluster
            started on this machine with ``ray start``), "HOST:PORT" or "ray://HOST:10001".
        local_cpus: CPUs of a new local cluster (None: all).
        workers: number of workers (0: one per GPU for GPU models, else one per ``worker_cpus``
            CPUs of the cluster; never more than there are work items).
        worker_cpus: CPUs each worker asks Ray for (and onnxruntime threads when ``threads`` is 0).
        worker_gpus: GPUs each worker asks for (None: 1 for engines / CUDA providers when the
            cluster has GPUs, else 0).
        batch: image files per work item. chunk_frames: least frames per video chunk.
        cache_models: models each worker keeps loaded (a manifest with many cameras).
        resume: skip outputs the ledger lists as finished and unchanged.
        overwrite: allow an output that replaces its input's own files (``-i DIR -o DIR``).
        max_retries: restarts of a dead worker and retries of its items.
        in_flight: items queued per worker (2 keeps a worker busy while results travel).
        dehazer: keyword arguments of :class:`~.dehazer.Dehazer` (providers, prefer, precision, tile,
            overlap, threads, color).
    """

    address: Optional[str] = None
    local_cpus: Optional[int] = None
    workers: int = 0
    worker_cpus: float = 1.0
    worker_gpus: Optional[float] = None
    batch: int = 8
    chunk_frames: int = 32
    cache_models: int = 3
    resume: bool = False
    overwrite: bool = False
    max_retries: int = 3
    in_flight: int = 2
    dehazer: dict[str, Any] = field(default_factory=dict)


def _default_factory(model: str, **options):
    from .dehazer import Dehazer

    return Dehazer(model, **options)


class FleetWorker:
    """A Ray actor's state: an LRU cache of dehazers and the code that runs one :class:`~.chunks.WorkItem`.

    Args:
        options: Dehazer keyword arguments.
        cache_models: how many models to keep loaded.
        factory: ``factory(model, **options)`` -> a callable uint8 frame -> uint8 frame with
            ``describe()`` and ``close()`` (default: :class:`~.dehazer.Dehazer`).
    """

    def __init__(self, options: dict[str, Any], cache_models: int = 3, factory: Optional[Callable] = None):
        self.options = dict(options)
        self.cache_models = max(1, int(cache_models))
        self.factory = factory or _default_factory
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        self.load_seconds = 0.0

    def identity(self) -> dict[str, Any]:
        """Node address, process id and whether Ray restarted this worker after its process died."""
        import ray

        restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(), "restarted": restarted}

    def _model(self, model: str):
        if model in self.models:
            self.models.move_to_end(model)
            return self.models[model]
        started = time.perf_counter()
        dehazer = self.factory(model, **self.options)
        self.load_seconds += time.perf_counter() - started
        self.loads += 1
        self.models[model] = dehazer
        while len(self.models) > self.cache_models:
            _, old = self.models.popitem(last=False)
            old.close()
        return dehazer

    def describe(self) -> list[dict[str, Any]]:
        """``describe()`` of the models loaded now."""
        return [d.describe() for d in self.models.values()]

    def _frames(self, item: WorkItem, skipped: list):
        from .streams import Frame, FrameSource

        if item.video is not None:
            for offset, image in enumerate(iter_video_range(item.video, item.start, item.stop)):
                yield Frame(item.start + offset, frame_name(item.start + offset), image)
            return
        # the reader of a one-process run over exactly these files: same pixels, same skip reasons
        source = FrameSource("images", item.files[0], len(item.files), None, _files=[Path(f) for f in item.files])
        yield from source
        skipped.extend(source.skipped)

    def run(self, item: WorkItem) -> dict[str, Any]:
        """Dehaze one item; write its image files (atomically) or return its frames for the video.

        Returns:
            dict with ``job``, ``seq``, ``frames``, ``seconds`` (busy time, model load excluded), ``latency_ms``,
            ``outputs`` [(name, bytes, sha256)], ``images`` [(index, name, uint8 array)] for a video
            output, ``skipped`` [(name, reason)], ``worker`` (node, pid) and model loads so far.
        """
        from .streams import ImageSink

        dehaze = self._model(item.model)
        started = time.perf_counter()  # busy time: reading, dehazing, writing (loading is load_seconds)
        sink = ImageSink(item.out_folder, name=item.out_name) if item.out_folder else None
        outputs, images, latency, skipped = [], [], [], []
        for frame in self._frames(item, skipped):
            tick = time.perf_counter()
            out = dehaze(frame.image)
            latency.append(1000.0 * (time.perf_counter() - tick))
            if sink is None:
                images.append((frame.index, frame.name, out))
            else:
                path = sink.write(frame, out)
                outputs.append((path.name, *file_digest(path)))
        return {
            "job": item.job,
            "seq": item.seq,
            "frames": len(latency),
            "seconds": time.perf_counter() - started,
            "latency_ms": latency,
            "outputs": outputs,
            "images": images,
            "skipped": skipped,
            "worker": self.identity(),
            "loads": self.loads,
            "load_seconds": self.load_seconds,
        }


# --------------------------------------------------------------------------- driver


def _connect(ray, options: FleetOptions) -> bool:
    """Join or start a cluster; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    address = options.address
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if address in (None, "", "local"):
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            kwargs["num_cpus"] = options.local_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--ray-address {address}: cannot join the Ray cluster ({line})") from None
    return True


def _wants_gpu(model: str, dehazer: dict[str, Any]) -> bool:
    """True when the first artefact a worker would open is a TensorRT engine, or the providers name a GPU."""
    try:
        from .select import resolve_model
    except ImportError:
        from .dehazer import resolve_model

    providers = [p.lower() for p in (dehazer.get("providers") or [])]
    if providers:
        return any("cuda" in p or "tensorrt" in p for p in providers)
    chosen = {k: dehazer[k] for k in ("prefer", "precision") if dehazer.get(k) is not None}
    candidates, _ = resolve_model(model, **chosen)
    first = getattr(candidates[0], "path", candidates[0])
    if Path(first).suffix.lower() in (".engine", ".plan", ".trt"):
        return True
    try:  # the default providers take CUDA where onnxruntime-gpu is installed (judged by this machine's)
        import onnxruntime

        return any(p in onnxruntime.get_available_providers() for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    except ImportError:
        return False


class _Stats:
    """Per-worker throughput for the record."""

    def __init__(self, count: int):
        self.rows = [{"worker": i, "node": None, "pids": [], "items": 0, "frames": 0, "busy_seconds": 0.0,
                      "model_loads": 0, "load_seconds": 0.0, "restarts": 0} for i in range(count)]  # fmt: skip

    def add(self, index: int, result: dict[str, Any]) -> None:
        row = self.rows[index]
        worker = result["worker"]
        row["node"] = worker["node"]
        if worker["pid"] not in row["pids"]:
            row["pids"].append(worker["pid"])
            row["restarts"] += int(worker["restarted"])  # each restarted process that returned work
        row["items"] += 1
        row["frames"] += result["frames"]
        row["busy_seconds"] += result["seconds"]
        row["model_loads"] = max(row["model_loads"], result["loads"])
        row["load_seconds"] = max(row["load_seconds"], result["load_seconds"])

    def as_list(self, seconds: float) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            busy = row["busy_seconds"]
            out.append({**row, "busy_seconds": round(busy, 3),
                        "fps_busy": row["frames"] / busy if busy > 0 else None,
                        "fps_wall": row["frames"] / seconds if seconds > 0 else None})  # fmt: skip
        return out


def _task_error(ray, exc: Exception, item: WorkItem, retries: int) -> UserError:
    """One line for a failed item: the worker's own UserError, or what Ray says went wrong."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return UserError(cause.message)
    where = item.video or (item.files[0] if item.files else "?")
    if isinstance(exc, ray.exceptions.RayActorError):
        return UserError(f"{where}: a worker died more than {retries} times on this item ({type(exc).__name__})")
    line = str(cause or exc).strip().splitlines()
    return UserError(f"{where}: the worker failed ({line[-1] if line else type(exc).__name__})")


def run_fleet(
    jobs: Sequence[Job],
    default_model: Optional[str],
    options: Optional[FleetOptions] = None,
    console=None,
    factory: Optional[Callable] = None,
) -> dict[str, Any]:
    """Run ``jobs`` on a Ray cluster; returns the JSON-ready record (what ``bilalora run`` writes as run.json).

    Args:
        jobs: input, output, model (None: ``default_model``) rows.
        default_model: export folder or model file for jobs without their own.
        options: :class:`FleetOptions`.
        console: rich console for the progress bar (None: rich's default).
        factory: Dehazer factory the workers use (see :class:`FleetWorker`).
    """
    from bilalora.progress import make_progress

    from .streams import StreamReport

    options = options or FleetOptions()
    if options.workers < 0 or options.worker_cpus <= 0 or (options.worker_gpus or 0) < 0:
        raise UserError("--workers, --worker-cpus and --worker-gpus: use positive numbers (--workers 0: automatic)")
    if options.in_flight < 1 or options.max_retries < 0:
        raise UserError("in_flight must be 1 or more and max_retries 0 or more")
    pixel = {k: options.dehazer.get(k) for k in _PIXEL_OPTIONS}
    keys: dict[str, str] = {}
    states: list[JobState] = []
    for index, job in enumerate(jobs):
        model = job.model or default_model
        if model is None:
            raise UserError(f"{job.input}: no model for this input (give --model or a model column)")
        model = str(Path(model).absolute())
        if model not in keys:
            if not Path(model).exists():
                raise UserError(f"--model {model}: no such file or folder (an export folder, a .onnx or a .engine)")
            keys[model] = model_key(model, pixel)
        states.append(plan_job(index, job, model, keys[model], options.batch, options.chunk_frames, options.resume,
                               options.overwrite))  # fmt: skip
    items = [item for state in states for item in state.items]
    total = sum(state.todo for state in states)
    models: list[dict[str, Any]] = []
    report = StreamReport()
    started = time.perf_counter()
    stats = _Stats(0)
    ray_info: dict[str, Any] = {"workers": [], "items": len(items), "batch": options.batch,
                                "chunk_frames": options.chunk_frames, "resume": options.resume,
                                "resumed_outputs": sum(s.done_outputs for s in states), "notes": []}  # fmt: skip
    if items:
        ray = import_ray()
        connecting = time.perf_counter()
        started_cluster = _connect(ray, options)
        ray_info["connect_seconds"] = round(time.perf_counter() - connecting, 3)
        started = time.perf_counter()  # the run's seconds: workers starting, loading, working (not the cluster)
        actors: list = []
        try:
            resources = ray.cluster_resources()
            gpus_free = float(resources.get("GPU", 0))
            wants_gpu = any(_wants_gpu(m, options.dehazer) for m in {i.model for i in items})
            worker_gpus = options.worker_gpus if options.worker_gpus is not None else (1.0 if wants_gpu and gpus_free else 0.0)
            if worker_gpus > gpus_free:
                raise UserError(f"--worker-gpus {worker_gpus:g}: the Ray cluster has {gpus_free:g} GPU(s)")
            # no more workers than the cluster can place now: an actor Ray cannot place waits forever
            fits = max(1, int(gpus_free // worker_gpus) if worker_gpus else int(float(resources.get("CPU", 1)) // options.worker_cpus))
            count = min(options.workers or fits, fits, len(items))
            if options.workers > fits:
                ray_info["notes"].append(f"--workers {options.workers}: the cluster fits {fits} worker(s) of "
                                         f"{options.worker_cpus:g} CPU / {worker_gpus:g} GPU; using {count}")  # fmt: skip
            dehazer = dict(options.dehazer)
            if not dehazer.get("threads") and not worker_gpus:
                dehazer["threads"] = max(1, int(options.worker_cpus))
            remote = ray.remote(FleetWorker).options(
                num_cpus=options.worker_cpus, num_gpus=worker_gpus, max_restarts=options.max_retries,
                max_task_retries=options.max_retries,
            )  # fmt: skip
            actors = [remote.remote(dehazer, options.cache_models, factory) for _ in range(count)]
            stats = _Stats(count)
            ray_info.update({"address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                             "cluster": {k: resources[k] for k in ("CPU", "GPU", "memory") if k in resources},
                             "worker_cpus": options.worker_cpus, "worker_gpus": worker_gpus})  # fmt: skip
            _schedule(ray, actors, items, states, options, stats, report, total, console, make_progress)
            models = _describe(ray, actors)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started_cluster:
                ray.shutdown()
    report.seconds = time.perf_counter() - started
    report.skipped = [pair for state in states for pair in state.skipped]
    ray_info["workers"] = stats.as_list(report.seconds)
    single = len(jobs) == 1
    dehazer = options.dehazer
    return {  # the keys of a one-process run.json (runtime.session), then the fleet's own
        "command": "run",
        "input": {"spec": jobs[0].input if single else f"{len(jobs)} inputs",
                  "kind": states[0].kind if single else "manifest",
                  "total": sum(s.total for s in states), "fps": states[0].fps if single else None},
        "output": jobs[0].output if single else None,
        "options": {**{k: dehazer.get(k) for k in ("prefer", "precision", "providers", "verify", "tile", "threads")},
                    "overwrite": options.overwrite, "max_frames": 0},
        "models": models,
        "switch": None,
        **report.as_dict(),
        "ray": ray_info,
        "jobs": [state.summary() for state in states],
    }  # fmt: skip


def _describe(ray, actors: list) -> list[dict[str, Any]]:
    seen, out = set(), []
    for rows in ray.get([actor.describe.remote() for actor in actors]):
        for row in rows:
            if row["model"] not in seen:
                seen.add(row["model"])
                out.append(row)
    return out


def _schedule(ray, actors, items, states, options, stats, report, total, console, make_progress) -> None:
    """Keep every worker ``in_flight`` items busy until all are done; feed results to their jobs."""
    pending = deque(items)
    window = max(8, 2 * len(actors) * options.in_flight)
    cached: list[OrderedDict] = [OrderedDict() for _ in actors]
    load = [0] * len(actors)
    running: dict[Any, tuple[int, WorkItem]] = {}

    def pick(worker: int) -> WorkItem:
        for position, item in enumerate(list(pending)[:window]):
            if item.model in cached[worker]:
                del pending[position]
                return item
        return pending.popleft()

    complete = False
    with make_progress(console) as progress:
        task = progress.add_task("run --ray", total=total, status=f"{len(actors)} worker(s)")
        try:
            while pending or running:
                for worker, actor in enumerate(actors):
                    while pending and load[worker] < options.in_flight:
                        item = pick(worker)
                        cached[worker][item.model] = True
                        cached[worker].move_to_end(item.model)
                        while len(cached[worker]) > options.cache_models:
                            cached[worker].popitem(last=False)
                        running[actor.run.remote(item)] = (worker, item)
                        load[worker] += 1
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    worker, item = running.pop(ref)
                    load[worker] -= 1
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                        raise _task_error(ray, exc, item, options.max_retries) from None
                    stats.add(worker, result)
                    states[result["job"]].accept(result["seq"], result["outputs"], result["images"],
                                                 result["skipped"], result["frames"])  # fmt: skip
                    report.frames += result["frames"]
                    report.latency_ms.extend(result["latency_ms"])
                    fps = report.frames / max(1e-9, progress.tasks[0].elapsed or 1e-9)
                    progress.update(task, advance=item.frames, status=f"{len(actors)} worker(s)  {fps:.1f} FPS")
            complete = True
        except KeyboardInterrupt:
            report.interrupted = True
            for ref in running:
                try:
                    ray.cancel(ref)
                except (ValueError, TypeError, RuntimeError):  # already finished, or not cancellable
                    pass
        finally:
            for state in states:
                state.finish(complete)
