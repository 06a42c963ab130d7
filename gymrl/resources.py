"""Resources a run config asks of this machine that it cannot have: checked before anything starts.

A run on a local Ray (``ray_address`` unset) needs its engines' Ray CPUs, on ``cuda`` their GPUs, and on
``cpu`` each engine's KV cache in host memory (``VLLM_CPU_KVCACHE_SPACE``, allocated when the engine
starts). When the machine cannot give them, the run would not fail but wait: Ray keeps an actor pending
forever when its CPUs or GPUs are not there, and a KV cache larger than the free memory gets the engine
killed after minutes of start-up. Each problem is one line naming the config key.

``gymrl train`` raises the first problem before it starts anything; ``gymrl train --dry-run`` shows them
as warnings (a plan may be checked on a login node for a GPU job). With ``ray_address`` set the cluster's
resources are not known here and nothing is checked.
"""

import os
import socket

from gymrl.config import RunConfig


class ResourceError(ValueError):
    """A config that asks this machine for more than it has; the message names the key."""


def machine_cpus() -> int:
    """CPUs this process may run on (the affinity mask, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0))


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (memory that can be had without swapping); total memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ray_node() -> dict[str, str]:
    """The Ray node this process runs on (a driver, or inside an actor): its id, IP address and host name, as a run
    records where each engine and trainer rank ran."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname()}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def cpu_problem(cfg: RunConfig, cpus: int | None = None) -> str | None:
    eng = cfg.engine
    needed = eng.num_engines * eng.cpus_per_engine
    if cfg.ray_num_cpus is not None:
        if needed > cfg.ray_num_cpus:
            return (f"engine.num_engines x engine.cpus_per_engine = {eng.num_engines} x {eng.cpus_per_engine:g} = "
                    f"{needed:g} Ray CPUs, more than ray_num_cpus={cfg.ray_num_cpus}: the engines would wait forever")
        return None
    cpus = machine_cpus() if cpus is None else cpus
    if needed > cpus:
        return (f"engine.num_engines x engine.cpus_per_engine = {eng.num_engines} x {eng.cpus_per_engine:g} = "
                f"{needed:g} Ray CPUs, more than the {cpus} CPUs of this machine (local Ray, ray_num_cpus unset): the "
                "engines would wait forever")
    return None


def engine_gpus(cfg: RunConfig) -> int:
    """GPUs the engines reserve through Ray."""
    return cfg.engine.num_engines * cfg.engine.tensor_parallel_size if cfg.engine.device == "cuda" else 0


def trainer_gpu(cfg: RunConfig, gpus: int | None = None) -> int | None:
    """The GPU index the trainer takes on a local Ray (None: it runs on CPU): the last GPU when the machine has more
    than the engines reserve (Ray is then given only the others, so no engine lands on it), else GPU 0, shared with
    an engine. None with train.workers > 1 too: the sharded trainer's ranks each reserve a GPU through Ray."""
    if cfg.train.device != "cuda" or cfg.train.workers > 1:
        return None
    gpus = visible_gpus() if gpus is None else gpus
    return gpus - 1 if gpus > engine_gpus(cfg) else 0


def ray_gpus(cfg: RunConfig, gpus: int | None = None) -> int | None:
    """``num_gpus`` for a local ``ray.init``: all but the trainer's own GPU, if it has one (Ray hands out GPUs 0 to
    num_gpus - 1); None lets Ray count them."""
    gpus = visible_gpus() if gpus is None else gpus
    own = trainer_gpu(cfg, gpus)
    return gpus - 1 if own is not None and gpus > engine_gpus(cfg) else None


def gpu_problem(cfg: RunConfig, gpus: int | None = None) -> str | None:
    eng = cfg.engine
    ranks = cfg.train.workers if cfg.train.device == "cuda" and cfg.train.workers > 1 else 0  # a GPU each
    if cfg.train.device == "cuda" and eng.device != "cuda":
        gpus = visible_gpus() if gpus is None else gpus
        if gpus == 0:
            return "train.device is cuda, but this machine shows no GPU (torch.cuda.device_count() = 0)"
        return _ranks_problem(ranks, 0, gpus)
    if eng.device != "cuda":
        return None
    gpus = visible_gpus() if gpus is None else gpus
    needed = eng.num_engines * eng.tensor_parallel_size
    if gpus == 0:
        return "engine.device is cuda, but this machine shows no GPU (torch.cuda.device_count() = 0)"
    if needed > gpus:
        return (f"engine.num_engines x engine.tensor_parallel_size = {eng.num_engines} x {eng.tensor_parallel_size} = "
                f"{needed} GPUs, more than the {gpus} this machine shows: the engines would wait forever")
    return _ranks_problem(ranks, needed, gpus)


def _ranks_problem(ranks: int, engines: int, gpus: int) -> str | None:
    if engines + ranks > gpus:
        return (f"train.workers={ranks} GPUs for the sharded trainer's ranks, beside the engines' {engines}, are more "
                f"than the {gpus} this machine shows: the ranks would wait forever")
    return None


def memory_problem(cfg: RunConfig, available: int | None = None) -> str | None:
    eng = cfg.engine
    if eng.device != "cpu":
        return None
    available = available_memory_bytes() if available is None else available
    needed = eng.num_engines * eng.kv_cache_gib * 2**30
    if needed > available:
        return (f"engine.kv_cache_gib={eng.kv_cache_gib} x engine.num_engines={eng.num_engines} = "
                f"{needed / 2**30:g} GiB of KV cache, more than the {available / 2**30:.1f} GiB of memory available "
                "here (MemAvailable)")
    return None


def placement_problem(cfg: RunConfig) -> str | None:
    """Custom Ray resources asked of a local Ray, which has none: the actors would wait forever."""
    for key, resources in (("engine.ray_resources", cfg.engine.ray_resources),
                           ("train.ray_resources", cfg.train.ray_resources)):
        if resources:
            return (f"{key}={resources} asks for custom Ray resources, which a local Ray (ray_address unset) does not "
                    "have: set ray_address to a cluster whose nodes were started with them, or unset the key")
    return None


def resource_problems(cfg: RunConfig) -> list[str]:
    """What this machine cannot give ``cfg`` (nothing when the run joins a Ray cluster)."""
    if cfg.ray_address is not None:
        return []
    return [p for p in (placement_problem(cfg), cpu_problem(cfg), gpu_problem(cfg), memory_problem(cfg)) if p]


def check_resources(cfg: RunConfig) -> None:
    """Raise :class:`ResourceError` with the first problem of :func:`resource_problems`."""
    problems = resource_problems(cfg)
    if problems:
        raise ResourceError(problems[0])
