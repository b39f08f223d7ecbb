"""Multi-host runs on JAX's multi-controller runtime: one process per host, one program, global arrays.

Every command that runs the model or trains over data (`train precompute`, `train probes`,
`train router`, `eval hybrid`, `eval baselines`) takes the same flags (`runtime.arguments`), each with
an environment fallback:

    --coordinator-address HOST:PORT   HMOE_COORDINATOR_ADDRESS   process 0's address, reachable by all
    --num-processes N                 HMOE_NUM_PROCESSES
    --process-id I                    HMOE_PROCESS_ID            0 <= I < N, one per process
    --local-device-ids 0,1,...        HMOE_LOCAL_DEVICE_IDS      devices this process drives (optional)
    --distributed                     HMOE_DISTRIBUTED=1         let JAX detect the cluster itself (TPU pod
                                                                 slice, SLURM, Open MPI, Kubernetes)

`initialize` calls `jax.distributed.initialize` once, before anything touches a device; with none
of them set, a run stays single-process and nothing changes. On CPU the cross-process collectives
are gloo's.

After it, `jax.devices()` lists every process's devices and meshes (`sharding.make_mesh`) span
them: the `data` axis (batches, the probe ensemble) crosses hosts, `expert` and `tensor` stay within
one. Inputs every process holds in full become global arrays with `global_array`; results come back
to every host with `to_host`. Shared files are written by process 0 alone (`on_coordinator`, which
also hands its errors to every process, so no process is left waiting in a collective).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

ENV_COORDINATOR = "HMOE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "HMOE_NUM_PROCESSES"
ENV_PROCESS_ID = "HMOE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "HMOE_LOCAL_DEVICE_IDS"
ENV_AUTO = "HMOE_DISTRIBUTED"
# Longest error message handed from process 0 to the others (bytes of UTF-8).
_MESSAGE_BYTES = 4096

T = TypeVar("T")


class DistributedError(ValueError):
    """Inconsistent multi-process settings, or a failure to join the other processes."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How (and whether) to join a multi-process run; `None` fields are left to JAX (auto mode)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False
    initialization_timeout: int = 300

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None or (self.num_processes or 1) > 1

    def validate(self) -> "Settings":
        n, i = self.num_processes, self.process_id
        if n is not None and n < 1:
            raise DistributedError(f"--num-processes must be >= 1, got {n}")
        if i is not None and i < 0:
            raise DistributedError(f"--process-id must be >= 0, got {i}")
        if n is not None and i is not None and i >= n:
            raise DistributedError(f"--process-id {i} is out of range for --num-processes {n} (0..{n - 1})")
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise DistributedError(f"--coordinator-address must be HOST:PORT, got {self.coordinator_address!r}")
        if self.local_device_ids is not None and (not self.local_device_ids or min(self.local_device_ids) < 0):
            raise DistributedError(f"--local-device-ids must be non-negative integers, got {self.local_device_ids}")
        if self.auto:
            return self  # JAX fills in what is missing from the cluster's environment, or says what it cannot.
        if self.enabled:
            missing = [flag for flag, value in (("--coordinator-address", self.coordinator_address),
                                                ("--num-processes", n), ("--process-id", i)) if value is None]
            if missing:
                raise DistributedError(
                    f"a multi-process run needs {', '.join(missing)} (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                    f"{ENV_PROCESS_ID}), or --distributed to let JAX detect the cluster")
        elif i not in (None, 0):
            raise DistributedError(f"--process-id {i} given without --num-processes and --coordinator-address")
        return self


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int

    @property
    def is_coordinator(self) -> bool:
        return self.process_index == 0


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def settings_from_args(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags first, then the environment; validated."""
    env = os.environ if environ is None else environ
    get = lambda attr: getattr(args, attr, None) if args is not None else None  # noqa: E731
    devices = get("local_device_ids") or env.get(ENV_LOCAL_DEVICE_IDS)
    if devices is not None and not isinstance(devices, (tuple, list)):
        devices = tuple(_int(d.strip(), "--local-device-ids") for d in str(devices).split(",") if d.strip())
    auto = get("distributed")
    if auto is None:
        auto = env.get(ENV_AUTO, "").lower() in ("1", "true", "yes")
    return Settings(
        coordinator_address=get("coordinator_address") or env.get(ENV_COORDINATOR) or None,
        num_processes=_int(get("num_processes") if get("num_processes") is not None else env.get(ENV_NUM_PROCESSES),
                           "--num-processes"),
        process_id=_int(get("process_id") if get("process_id") is not None else env.get(ENV_PROCESS_ID),
                        "--process-id"),
        local_device_ids=tuple(devices) if devices is not None else None,
        auto=bool(auto),
    ).validate()


_initialized_with: Settings | None = None


def initialize(settings: Settings | argparse.Namespace | None = None) -> ProcessInfo:
    """Join the multi-process run `settings` describes (flags, else the environment), once per process.

    A no-op for a single-process run. Must come before anything touches a device (JAX refuses
    otherwise; raised as DistributedError). Calling again with the same settings is harmless."""
    global _initialized_with
    import jax

    if not isinstance(settings, Settings):
        settings = settings_from_args(settings)
    if settings.enabled and _initialized_with is None and not jax.distributed.is_initialized():
        # Gloo for cross-process collectives on CPU (JAX's default, made explicit), unless MPI was chosen.
        if jax.config.jax_cpu_collectives_implementation != "mpi":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(
                coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
                process_id=settings.process_id,
                local_device_ids=list(settings.local_device_ids) if settings.local_device_ids is not None else None,
                initialization_timeout=settings.initialization_timeout)
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"cannot join the multi-process run ({settings}): {err}") from None
        _initialized_with = settings
        if settings.num_processes is not None and jax.process_count() != settings.num_processes:
            raise DistributedError(f"asked for {settings.num_processes} processes, JAX sees {jax.process_count()}")
    elif settings.enabled and _initialized_with is not None and settings != _initialized_with:
        raise DistributedError(f"already initialized with {_initialized_with}, asked {settings}")
    return process_info()


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_coordinator() -> bool:
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier over every process (no-op when single-process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(value: Any) -> Any:
    """Process 0's value of a pytree of arrays, on every process (itself when single-process)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def on_coordinator(fn: Callable[[], T], error_type: type[Exception] = RuntimeError) -> T | None:
    """Run `fn` on process 0 only (shared files: metadata, reports); the others wait for it.

    Returns fn's value on process 0 and None elsewhere. If fn raises on process 0, every process
    raises: process 0 its own exception, the others `error_type` with its message."""
    import jax

    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every process, then re-raised
            error = err
    message = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        text = str(error).encode()[:_MESSAGE_BYTES]
        message[0] = 1
        message[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    message = broadcast(message)
    if error is not None:
        raise error
    if message[0]:
        raise error_type(bytes(message[1:]).rstrip(b"\0").decode(errors="replace"))
    return result


def global_array(value: np.ndarray, sharding) -> "jax.Array":  # noqa: F821
    """A global array from a host value every process holds in full (same bytes everywhere); each
    process places only its own devices' shards."""
    import jax

    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of arrays; arrays spread over several processes are gathered first,
    so every process gets the full value."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
