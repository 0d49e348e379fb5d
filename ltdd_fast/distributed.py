"""Many processes under torchrun: the process group, and the few collectives the stages need.

`torchrun --nproc-per-node N $(which ltdd) COMMAND ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous in their environment; `init()` joins them into one process group (NCCL for CUDA devices, Gloo for
the CPU) and gives each rank its device (cuda:LOCAL_RANK, or the CPU). Without torchrun's environment there is no
group and every helper here is the single-process identity, so a plain run is unchanged.

Only rank 0 prints progress and writes shared files; every rank runs the same code, so every collective is reached
by all of them in the same order. A rank that dies or hangs makes the others' next collective fail after `timeout`
seconds; `collective_failure` turns that into one line that names the rank that saw it and what went missing.
A leaf: it imports torch and errors only.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import LTDDError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for the slowest rank (LTDD_TIMEOUT overrides)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process prints and writes the shared files (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def mine(self, items):
        """The items this rank takes when they are dealt round-robin: item i goes to rank i mod size."""
        return [x for i, x in enumerate(items) if i % self.size == self.rank]


_WORLD = World()


def world() -> World:
    return _WORLD


def from_env(environ=None) -> World:
    """The World that torchrun's environment describes (World() without one). A malformed one is one line."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        rank, size, local = (int(environ.get(k, "0")) for k in ENV)
    except ValueError:
        raise LTDDError(f"torchrun's environment is malformed: {', '.join(f'{k}={environ.get(k)!r}' for k in ENV)}; "
                        f"expected integers") from None
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise LTDDError(f"torchrun's environment is inconsistent: RANK {rank}, WORLD_SIZE {size}, LOCAL_RANK {local}")
    return World(rank, size, local)


def timeout_seconds(environ=None) -> float:
    environ = os.environ if environ is None else environ
    text = environ.get("LTDD_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LTDDError(f"LTDD_TIMEOUT={text!r}: expected a positive number of seconds")
    return value


def init(device: str | None = None, timeout: float | None = None) -> World:
    """Join torchrun's process group (once; nothing without torchrun). device: the device the command asked for:
    "cuda" becomes cuda:LOCAL_RANK (NCCL), anything else runs on Gloo. Returns the World."""
    global _WORLD
    found = from_env()
    if not found.active:
        _WORLD = found
        return found
    if dist.is_initialized():
        return _WORLD
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(found.local_rank)
    seconds = timeout if timeout is not None else timeout_seconds()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    _WORLD = found
    return found


@contextlib.contextmanager
def alone():
    """Inside: this process behaves as a single process (world() is one rank, no collective), e.g. to measure a
    baseline on rank 0 while the others wait."""
    global _WORLD
    kept, _WORLD = _WORLD, World()
    try:
        yield
    finally:
        _WORLD = kept


def rank_device(device: str) -> str:
    """The device this rank computes on: cuda:LOCAL_RANK when the command asked for "cuda" under torchrun."""
    if _WORLD.active and str(device) == "cuda":
        return f"cuda:{_WORLD.local_rank}"
    return str(device)


def shutdown(clean: bool = True):
    """Leave the process group. clean: every rank got here (they wait for each other first, since a rank that
    tears its connections down while another still uses them aborts that one); after an error, leave at once."""
    if dist.is_initialized():
        if clean and _WORLD.active:
            try:
                dist.barrier()
            except (RuntimeError, dist.DistBackendError):
                pass
        dist.destroy_process_group()


def silent_ranks(wait: float = 3.0):
    """The ranks that do not answer on the rendezvous store within `wait` seconds (each rank that gets here says
    it is alive there), or None when the store itself is gone (the process that held it died)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"ltdd/alive/{_WORLD.rank}", "1")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(_WORLD.size) if not store.check([f"ltdd/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any failure of the store means it cannot tell
        return None


def collective_failure(exc: Exception, what: str) -> LTDDError:
    """One line for a collective that failed because another rank died or hung past the timeout, naming the
    ranks that no longer answer when the rendezvous store can tell."""
    detail = " ".join(str(exc).split())[:200]
    missing = silent_ranks()
    who = (f"rank(s) {', '.join(map(str, missing))} stopped answering" if missing else
           "the other ranks were lost (the rendezvous store cannot say which)")
    return LTDDError(f"rank {_WORLD.rank} of {_WORLD.size}: {who} while {what} (a rank died, or hung past the "
                     f"{timeout_seconds():g} s timeout; set LTDD_TIMEOUT to wait longer): {detail}; what was already "
                     f"saved is kept, and rerunning the same command resumes")


def _guard(what, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise collective_failure(exc, what) from None


def barrier(what: str):
    if _WORLD.active:
        _guard(what, dist.barrier)


def gather_objects(obj, what: str) -> list:
    """Every rank's obj, in rank order, on every rank ([obj] without a group)."""
    if not _WORLD.active:
        return [obj]
    out = [None] * _WORLD.size
    _guard(what, dist.all_gather_object, out, obj)
    return out


def all_reduce_sum(tensors, what: str):
    """Sum each tensor over the ranks, in place (on its own device)."""
    if not _WORLD.active:
        return tensors
    for t in tensors:
        _guard(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return tensors


def computed_by_main(compute, key: str, what: str):
    """compute() on rank 0 alone, its value (JSON: nothing read back can run code) on every rank. The other ranks wait on the rendezvous
    store, a blocking read that takes no CPU, where a collective would poll: a measurement taken on rank 0 meanwhile
    has the machine to itself."""
    if not _WORLD.active:
        return compute()
    store = dist.distributed_c10d._get_default_store()
    name = f"ltdd/{key}"
    if _WORLD.main:
        value = compute()
        store.set(name, json.dumps(value))
        return value
    try:
        return json.loads(store.get(name))
    except (RuntimeError, dist.DistStoreError) as exc:
        raise collective_failure(exc, what) from None


def all_ok(check, what: str):
    """Run check() on every rank and keep them in step: if it raised an LTDDError on any rank, raise it on every
    rank (the first failing rank's message), so that none is left waiting in a collective the others never reach.
    Returns check()'s value on this rank."""
    if not _WORLD.active:
        return check()
    value, error = None, None
    try:
        value = check()
    except LTDDError as exc:
        error = str(exc)
    errors = gather_objects(error, what)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        raise LTDDError(message if rank == _WORLD.rank else f"rank {rank}: {message}")
    return value


def check_replicas(tensors, iteration: int, checkpoint):
    """Under torchrun every rank must hold the same synthetic set: the sha256 of `tensors` is compared across the
    ranks at each checkpoint, and a mismatch raises (on every rank) before anything is saved; `checkpoint` is the
    last checkpoint's path, which is kept. Nothing without torchrun."""
    if not world().active:
        return
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = gather_objects(digest.hexdigest(), "comparing the ranks' synthetic sets")
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise LTDDError(f"the synthetic set of rank(s) {', '.join(map(str, differ))} differs from rank 0's at "
                        f"iteration {iteration}: the ranks diverged (a nondeterministic kernel, or hardware); "
                        f"the last checkpoint, {checkpoint}, is kept")
