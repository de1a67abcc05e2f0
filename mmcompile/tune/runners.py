"""Where candidates are measured: this machine (MetaSchedule's ``LocalRunner``) or machines
registered with a TVM RPC tracker (``RPCRunner``).

Both stock runners open ``tvm.runtime.device(target.kind.name)``, and with apache-tvm-ffi
0.1.14 ``device("llvm")`` raises "Unknown device: llvm": every trial of a CPU task failed.
:class:`DeviceRunner` hands them the device name instead.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import (EvaluatorConfig, LocalRunner, PyRunner, RPCConfig,
                                            RPCRunner, RunnerInput)

from mmcompile.tune.builder import ignore_sigint
from mmcompile.tune.database import TuningError

_DEVICE_OF_KIND = {"llvm": "cpu", "c": "cpu"}


@dataclass(frozen=True)
class RPCSpec:
    """A TVM RPC tracker and the key its measurement servers registered under."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"


def parse_tracker(address: str, key: str | None) -> RPCSpec:
    """``HOST:PORT`` and a key -> RPCSpec.

    Raises:
        TuningError: malformed address or missing key.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TuningError(f"expected HOST:PORT for the RPC tracker, got '{address}'")
    if not key:
        raise TuningError("an RPC tracker needs the key its servers registered with "
                            "(--rpc-key, e.g. the -key given to tvm.exec.rpc_server)")
    return RPCSpec(host, int(port), key)


def tracker_servers(spec: RPCSpec) -> int:
    """How many servers are registered with ``spec.key`` (free or busy).

    Raises:
        TuningError: the tracker cannot be reached.
    """
    from tvm import rpc
    try:
        summary = rpc.connect_tracker(spec.host, spec.port).summary()
    except Exception as exc:
        raise TuningError(f"cannot reach the RPC tracker at {spec.host}:{spec.port}: "
                            f"{exc}") from exc
    return sum(1 for server in summary.get("server_info", [])
               if server.get("key") == f"server:{spec.key}")


@derived_object
class DeviceRunner(PyRunner):
    """Forwards to ``inner`` with the device (``cpu``) in place of the target kind (``llvm``)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def run(self, runner_inputs: list[RunnerInput]):
        fixed = [RunnerInput(i.artifact_path, _DEVICE_OF_KIND.get(str(i.device_type),
                                                                  str(i.device_type)),
                             i.args_info) for i in runner_inputs]
        return self.inner.run(fixed)


def evaluator(min_repeat_ms: int = 40) -> EvaluatorConfig:
    """Three repeats, each running the kernel for at least ``min_repeat_ms``."""
    return EvaluatorConfig(number=1, repeat=3, min_repeat_ms=min_repeat_ms,
                           enable_cpu_cache_flush=False)


def runner_init(threads: int = 0) -> None:
    """Runner-process initializer: ignore Ctrl-C (see :func:`~.builder.ignore_sigint`), size
    TVM's thread pool, which reads ``TVM_NUM_THREADS`` on first use, to the target's cores,
    and ask for AMX tile state (int8 kernels may use tiles: without it they fault)."""
    from mmcompile.targets.tvm.executable import enable_amx
    ignore_sigint()
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    enable_amx()


def make_runner(rpc: RPCSpec | None = None, threads: int = 0, timeout_s: float = 30.0,
                min_repeat_ms: int = 40):
    """A runner measuring here (``rpc=None``, kernels use ``threads`` threads) or through the
    tracker, with one concurrent session per registered server.

    Raises:
        TuningError: the tracker is unreachable or has no server with the key.
    """
    if rpc is None:
        return DeviceRunner(LocalRunner(timeout_sec=timeout_s,
                                        initializer=functools.partial(runner_init, threads),
                                        evaluator_config=evaluator(min_repeat_ms)))
    servers = tracker_servers(rpc)
    if servers == 0:
        raise TuningError(f"no RPC server is registered with key '{rpc.key}' at "
                            f"{rpc.host}:{rpc.port}")
    config = RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                       session_timeout_sec=int(timeout_s))
    return DeviceRunner(RPCRunner(rpc_config=config, evaluator_config=evaluator(min_repeat_ms),
                                  max_workers=servers, initializer=ignore_sigint))
