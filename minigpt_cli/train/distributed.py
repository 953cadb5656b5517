"""The process group: the one module that knows training may run in several processes.

torchrun (or ``minigpt train --nproc N``, which calls the same launcher) starts one process
per rank and tells each its place through the environment; this module reads it, joins the
group (nccl on CUDA, gloo on the CPU) and answers the rest of the code's questions: which
rank am I, how many are we, am I the main one. It also holds the few collectives the
trainer needs, wraps a model for DDP or FSDP2, and launches a job on this machine.

Training collectives run in a group with a timeout (``TIMEOUT_S``): a rank that dies or
hangs makes the others fail with ``PeerLost`` within it instead of waiting forever. Setup
(rank 0 tokenizing a large dataset while the others wait) uses the default group, whose
timeout is long.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from minigpt_cli.errors import DeviceError, MiniGPTError

TIMEOUT_S = float(os.environ.get("MINIGPT_DIST_TIMEOUT", "60"))  # training collectives
SETUP_TIMEOUT_S = 30 * 60  # waiting for rank 0 to tokenize, load or save


class PeerLost(MiniGPTError):
    """Another rank died or stopped answering: every rank that notices says so."""


class RankFailed(MiniGPTError):
    """Rank 0 failed during setup and said why; the other ranks leave quietly."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_info = DistInfo()
_group = None  # the training group (with TIMEOUT_S)


def launched() -> bool:
    """Whether this process was started by torchrun (or ``minigpt train --nproc``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_info() -> DistInfo:
    """This process's place, from torchrun's environment (a single process without it)."""
    if not launched():
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ["WORLD_SIZE"]))


def info() -> DistInfo:
    """This process's place in the group joined by :func:`init` (rank 0 of 1 before)."""
    return _info


def is_main() -> bool:
    return _info.is_main


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the group torchrun set up (nothing to do in a single process); returns this
    rank's place and the device it computes on (``cuda:LOCAL_RANK`` for CUDA)."""
    global _info, _group
    wanted = env_info()
    if not wanted.enabled or dist.is_initialized():
        return _info, device
    if device.type == "cuda":
        if wanted.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"rank {wanted.rank} needs GPU {wanted.local_rank} but "
                              f"{torch.cuda.device_count()} are visible",
                              "start at most one process per GPU")
        device = torch.device("cuda", wanted.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DeviceError(f"device {device.type} cannot train in several processes",
                          "use cuda or cpu", setting="device")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=SETUP_TIMEOUT_S),
                                **({"device_id": device} if device.type == "cuda" else {}))
        _group = dist.new_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError, ...
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise PeerLost(f"rank {wanted.rank} could not join the other processes at {where} "
                       f"({_first_line(e)})", "check that the rendezvous endpoint is up and "
                       "reachable, and that every node was started") from e
    _info = wanted
    return _info, device


def cleanup() -> None:
    global _info, _group
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _info, _group = DistInfo(), None


# ---- collectives (no-ops in a single process) ------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone."""
    return _info.enabled and isinstance(e, RuntimeError) and (
        isinstance(e, dist.DistError) or any(
            s in str(e) for s in ("gloo", "Gloo", "NCCL", "Connection", "timed out",
                                  "Timed out", "closed", "ProcessGroup")))


def lost(e: BaseException, step: int | None, last: Any = None) -> PeerLost:
    """The error of a rank whose peers are gone: at ``step`` of training, or (None) while
    the ranks set up the run."""
    why = f"another rank died or hung: {_first_line(e)}"
    if step is None:
        return PeerLost(f"rank {_info.rank} lost the other processes while setting up the "
                        f"run ({why})", "start the job again on every node")
    if last:
        return PeerLost(f"rank {_info.rank} lost the other processes at step {step} ({why}); "
                        f"the last checkpoint is {last}",
                        "resume the run with the same number of processes")
    return PeerLost(f"rank {_info.rank} lost the other processes at step {step} ({why}); no "
                    "checkpoint was saved yet", "start the job again on every node")


@contextlib.contextmanager
def setting_up():
    """The collectives of setting up a run (the weights broadcast, DDP's checks): a rank
    that is gone makes the others raise ``PeerLost``, as during training."""
    try:
        yield
    except RuntimeError as e:
        if is_peer_failure(e):
            raise lost(e, None) from e
        raise


def barrier() -> None:
    if _info.enabled:
        dist.barrier(group=_group)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over the ranks."""
    if not _info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_group)
    return out / _info.world_size


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks."""
    if not _info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_group)
    return out


def largest(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value`` (say, a stop asked for by a signal: its number,
    0 for none)."""
    if not _info.enabled:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group)
    return int(t.item())


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None on the others. Objects travel
    pickled between our own processes; nothing read from disk is ever unpickled."""
    if not _info.enabled:
        return [obj]
    out = [None] * _info.world_size if _info.is_main else None
    dist.gather_object(obj, out, dst=0, group=_group)
    return out


def share_from_main(obj: Any = None, long_wait: bool = True) -> Any:
    """Rank 0's ``obj`` on every rank. ``long_wait``: through the default group, for the
    others to wait while rank 0 sets up."""
    if not _info.enabled:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0, group=None if long_wait else _group)
    except RuntimeError as e:
        raise lost(e, None) from e
    return box[0]


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if not _info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


# ---- models: DDP and FSDP2 --------------------------------------------------------------------

def shard(model: torch.nn.Module, precision_dtype: torch.dtype | None) -> None:
    """FSDP2: shard every block, then the rest (embeddings, final norm, the tied head), in
    place; parameters, gradients and optimizer state are split over the ranks. Mixed
    precision: parameters computed in ``precision_dtype``, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=precision_dtype, reduce_dtype=torch.float32) \
        if precision_dtype is not None else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, process_group=_group)


def sync_gradients(train_model: torch.nn.Module, strategy: str, sync: bool):
    """A context for one micro-step's backward: gradients are reduced over the ranks only
    when ``sync`` (the last micro-step of a step); before, they accumulate locally."""
    if not _info.enabled or sync:
        if strategy == "fsdp" and _info.enabled:
            train_model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if strategy == "fsdp":
        train_model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return train_model.no_sync()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole model and optimizer state of a sharded model, on rank 0 (a collective:
    every rank calls it). The optimizer state comes back numbered like a plain optimizer's
    (parameter index in ``optimizer.param_groups`` order), so the run directory does not
    change with the strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, osd = get_state_dict(model, optimizer, options=opts)
    if not _info.is_main:
        return {}, {}
    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    groups, n = [], 0
    for g in osd["param_groups"]:
        groups.append({**g, "params": list(range(n, n + len(g["params"])))})
        n += len(g["params"])
    return weights, {"state": {index[k]: v for k, v in osd["state"].items()},
                     "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    weights: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Put the whole state (as :func:`full_state` returns it) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]}
              for g in optim_state["param_groups"]]
    osd = {"state": {names[int(i)]: v for i, v in optim_state["state"].items()},
           "param_groups": groups}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


# ---- launching on this machine ----------------------------------------------------------------

@dataclass
class JobFailure:
    rank: int
    exitcode: int  # negative: killed by that signal

    def describe(self) -> str:
        if self.exitcode < 0:
            import signal

            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"rank {self.rank} was killed by {name}"
        return f"rank {self.rank} exited with code {self.exitcode}"


class RendezvousFailed(MiniGPTError):
    """The nodes of a job could not meet at the rendezvous endpoint."""


STOP_CODES = (130, 143)  # a rank's exit after Ctrl-C or SIGTERM, its checkpoint saved


def launch(nproc: int, argv: list[str], nnodes: int = 1, endpoint: str | None = None
           ) -> tuple[int, list[JobFailure]]:
    """Run ``python -m minigpt_cli ARGV`` in ``nproc`` processes on this machine through
    torchrun's own launcher (elastic, c10d rendezvous, no restarts): on a free local port,
    or with the other ``nnodes`` at ``endpoint``. Returns the exit code for the job (0,
    128 + a signal the job got, or the first failing rank's code) and the failures."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The ranks say what failed. Each of torch's launcher loggers has a level of its own (its
    # "Received 2 death signal, shutting down workers" would pass a parent's), so all are set.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    timeouts = {"join_timeout": max(TIMEOUT_S, 1), "read_timeout": max(TIMEOUT_S, 1)}
    # torch's launcher keeps per-rank error files in a folder of its own under /tmp and
    # never removes it: one folder per job. Here it is the job's and goes with it.
    logs = tempfile.TemporaryDirectory(prefix="minigpt-launch-")
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          logs_specs=DefaultLogsSpecs(log_dir=logs.name),
                          run_id=os.environ.get("MINIGPT_RUN_ID") or ("minigpt" if endpoint
                                                                      else uuid.uuid4().hex),
                          rdzv_backend="c10d", rdzv_endpoint=endpoint or "localhost:0",
                          rdzv_configs=timeouts if endpoint else {}, max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        with logs:
            elastic_launch(config, entrypoint=sys.executable)("-m", "minigpt_cli", *argv)
    except SignalException as e:
        return 128 + int(e.sigval), []
    except ChildFailedError as e:
        if not e.failures:
            raise

        failures = [JobFailure(rank, f.exitcode) for rank, f in e.failures.items()]
        failures.sort(key=lambda f: f.rank)
        # A job asked to stop (Ctrl-C, SIGTERM) ends each rank with 130 or 143 at one step;
        # the launcher ends the ranks still on their way out with SIGTERM when the first
        # leaves. Those are the stop too, not a rank that died.
        stopped = [f for f in failures if f.exitcode in STOP_CODES]
        if stopped and all(f.exitcode in STOP_CODES or f.exitcode == -signal.SIGTERM
                           for f in failures):
            return stopped[0].exitcode, []
        signalled = [f for f in failures if f.exitcode < 0]
        code = 1 if signalled else failures[0].exitcode
        return code, failures
    except (RendezvousError, RuntimeError, ValueError) as e:  # in the agent
        raise RendezvousFailed(f"the job's nodes could not meet at {endpoint or 'localhost'} "
                               f"({_first_line(e)})", "check that the rendezvous endpoint "
                               "is up and reachable, and that every node was started") from e
    return 0, []

