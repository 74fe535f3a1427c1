"""The process group (mx.distributed over whatever mlx.launch set up: ring on CPUs, NCCL on CUDA,
MPI), with a bound on waiting for the other processes and one error for a lost peer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import mlx.core as mx

from stratlm.core.errors import DistributedError
from stratlm.core.log import get_logger

log = get_logger(__name__)

#: seconds a process waits for the others to join before it gives up (STRATLM_DIST_TIMEOUT)
DEFAULT_JOIN_TIMEOUT = 120.0
#: seconds a rank waits on the others within one forward before it gives up (STRATLM_DIST_STEP_TIMEOUT)
DEFAULT_STEP_TIMEOUT = 300.0
#: seconds a stuck process with on_stuck hooks lives on so that they can answer (then it is ended all the same)
STUCK_GRACE = 10.0
#: what the launchers set; without any of them mx.distributed.init returns at once (one process)
LAUNCH_VARIABLES = ("MLX_HOSTFILE", "MLX_RANK", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR")


_group: mx.distributed.Group | None = None
_lost: DistributedError | None = None  # the first loss seen: every later use of the group fails with it


def group_lost() -> bool:
    """Whether a peer of this process's group was found gone."""
    return _lost is not None


def lost_error() -> DistributedError | None:
    """The error that reported the group's loss (None while it is whole)."""
    return _lost


def seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise DistributedError(f"{name} must be a number of seconds, got {value!r}") from None


def join_timeout() -> float:
    return seconds_from_env("STRATLM_DIST_TIMEOUT", DEFAULT_JOIN_TIMEOUT)


class Watchdog:
    """Ends this process with a clear message once it has waited on the group for longer than
    STRATLM_DIST_STEP_TIMEOUT seconds (default 300) within one forward. A lost peer usually
    raises at once ("connection lost"), but a rank whose collective was in flight with the lost
    one can stay blocked in MLX for ever; mx.eval releases the GIL, so this thread still runs.

    `on_stuck` hooks (rank 0's scheduler) first get the error, the group is marked lost, and the
    process has STUCK_GRACE seconds to answer what waited on the stuck thread (a server's 503)
    and end on its own before it is ended."""

    def __init__(self, rank: int, limit: float):
        self.rank, self.limit = rank, limit
        self.since: float | None = None  # when the current wait began (None: not waiting on the group)
        self.on_stuck: list[Callable[[DistributedError], None]] = []
        threading.Thread(target=self._watch, daemon=True, name="stratlm-dist-watchdog").start()

    def arm(self) -> None:
        self.since = time.monotonic()

    def disarm(self) -> None:
        self.since = None

    def kick(self) -> None:
        """Progress: restart the count if armed."""
        if self.since is not None:
            self.since = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.limit / 4))
            since = self.since
            if since is not None and time.monotonic() - since > self.limit:
                self._give_up()

    def _give_up(self) -> None:
        global _lost
        message = (f"rank {self.rank}: no progress from the other processes of the group for {self.limit:g} s: "
                   "one is gone or stuck; giving up (STRATLM_DIST_STEP_TIMEOUT sets the limit)")
        if self.on_stuck:
            error = DistributedError(message)
            _lost = _lost or error
            for hook in list(self.on_stuck):
                try:
                    hook(error)
                except Exception as exc:  # noqa: BLE001 - ending the process below all the same
                    log.warning("a stuck-group hook failed", error=repr(exc))
            time.sleep(STUCK_GRACE)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(1)


_watchdog: Watchdog | None = None


def watchdog(rank: int) -> Watchdog:
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog(rank, seconds_from_env("STRATLM_DIST_STEP_TIMEOUT", DEFAULT_STEP_TIMEOUT))
    return _watchdog


def init_group(backend: str = "any") -> mx.distributed.Group:
    """The group of all launched processes (size 1 when not launched by mlx.launch or mpirun).

    mx.distributed.init blocks, holding the GIL, until every rank has connected: a rank that never
    starts would hang the others for ever. A small watchdog process ends this one with a clear
    message after STRATLM_DIST_TIMEOUT seconds (default 120) unless the group formed by then."""
    global _group
    if _group is not None:
        return _group
    launched = any(v in os.environ for v in LAUNCH_VARIABLES)
    watchdog = start_watchdog(join_timeout()) if launched else None
    try:
        _group = mx.distributed.init(strict=launched, backend=backend)
    except RuntimeError as exc:
        raise DistributedError(f"could not form the process group ({backend} backend): {exc}; "
                               f"launch with `mlx.launch -n N ...` (see docs/distributed.md)") from exc
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
    log.debug("process group", rank=_group.rank(), size=_group.size())
    return _group


def start_watchdog(seconds: float) -> subprocess.Popen:
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (f"error: rank {rank}: the other processes of the group did not all join within {seconds:g} s "
               "(one failed to start, or the hostfile names wrong addresses); giving up (STRATLM_DIST_TIMEOUT sets the wait)\n")
    code = ("import os, signal, sys, time\n"
            f"time.sleep({seconds!r})\n"
            f"sys.stderr.write({message!r}); sys.stderr.flush()\n"
            f"os.kill({os.getpid()}, signal.SIGTERM)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


def is_peer_loss(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("[ring]", "[nccl]", "[mpi]", "[jaccl]", "peer", "NCCL"))


@contextlib.contextmanager
def peer_errors(rank: int) -> Iterator[None]:
    """Turn the backend's 'connection lost' RuntimeError into a DistributedError naming this rank."""
    global _lost
    try:
        yield
    except RuntimeError as exc:
        if is_peer_loss(exc):
            error = DistributedError(f"rank {rank}: another process of the distributed group is gone ({exc}); see its output for why")
            _lost = _lost or error
            raise error from exc
        raise
