"""A TVM RPC tracker and measurement servers started on this machine, and stopped leaving no
process behind: for tests, and to try ``--rpc-tracker`` before setting up real machines.

On real machines the same programs run by hand::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190            # one machine
    python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key cpu-x86    # each measuring host
    mmcompile tune model.onnx --db tuning/ --rpc-tracker TRACKER:9190 --rpc-key cpu-x86

Measuring hosts must share the tuning target's CPU (``--mcpu``): candidates are built here
and run there. Each program is started in its own session (process group): ``rpc_server``
forks a child per measurement session and the tracker serves from a child process, so
stopping only the top process would orphan them; :meth:`LocalRPCCluster.close` signals each
whole group and then any descendant that escaped it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from mmcompile.tune.database import TuningError
from mmcompile.tune.runners import RPCSpec, tracker_servers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalRPCCluster:
    """A tracker and ``servers`` RPC servers on ``host``, as a context manager.

    Args:
        servers: measurement servers to start.
        key: the key they register under.
        threads: ``TVM_NUM_THREADS`` of each server (kernels measured there use this many).
        timeout_s: how long to wait for all servers to register.

    Raises:
        TuningError: a program exited early or the servers did not register in time.
    """

    def __init__(self, servers: int = 2, key: str = "mmcompile-local", host: str = "127.0.0.1",
                 threads: int = 1, timeout_s: float = 180.0) -> None:
        self.key, self.host, self.timeout_s = key, host, timeout_s
        self.n_servers, self.threads = servers, threads
        self.port = free_port(host)
        self.tracker: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def spec(self) -> RPCSpec:
        return RPCSpec(self.host, self.port, self.key)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        env = {**os.environ, "TVM_NUM_THREADS": str(self.threads)}
        return subprocess.Popen([sys.executable, "-m", *args], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> LocalRPCCluster:
        self.tracker = self._spawn(["tvm.exec.rpc_tracker", "--host", self.host, "--port",
                                    str(self.port), "--port-end", str(self.port + 1), "--silent"])
        self._wait(lambda: _listening(self.host, self.port), "the tracker to listen")
        for _ in range(self.n_servers):
            self.add_server()
        self._wait(lambda: self.registered() >= self.n_servers,
                   f"{self.n_servers} servers to register")
        return self

    def add_server(self) -> subprocess.Popen:
        port = free_port(self.host)
        server = self._spawn(["tvm.exec.rpc_server", "--tracker", self.address, "--key",
                              self.key, "--host", self.host, "--port", str(port), "--port-end",
                              str(port + 50), "--silent"])
        self.servers.append(server)
        return server

    def registered(self) -> int:
        try:
            return tracker_servers(self.spec)
        except TuningError:
            return 0

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            dead = [p for p in [self.tracker, *self.servers] if p and p.poll() is not None]
            if dead:
                raise TuningError(f"RPC cluster: {dead[0].args[2]} exited with "
                                  f"{dead[0].returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise TuningError(f"RPC cluster: timed out after {self.timeout_s:g} s waiting "
                                  f"for {what}")
            time.sleep(0.5)

    def pids(self) -> set[int]:
        """Every live process of the cluster, descendants included."""
        import psutil
        found = set()
        for proc in [self.tracker, *self.servers]:
            if proc is None or proc.poll() is not None:
                continue
            try:
                top = psutil.Process(proc.pid)
                found.add(top.pid)
                found.update(child.pid for child in top.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return found

    def kill_server(self, index: int) -> None:
        """Kill one server and its session children at once (SIGKILL), as a crash would."""
        _kill_group(self.servers[index], signal.SIGKILL)

    def close(self) -> None:
        """Stop everything: SIGTERM to each group, SIGKILL to what is left after 5 s."""
        import psutil
        procs = [p for p in [*self.servers, self.tracker] if p is not None]
        survivors: dict[int, float] = {}
        for proc in procs:
            survivors.update(_descendants(proc.pid))
            _kill_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        left = []
        for pid, created in survivors.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:  # the same process, not a reused pid
                    left.append(proc)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(left, timeout=5)  # session children exit after their parent
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def __enter__(self) -> LocalRPCCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _descendants(pid: int) -> dict[int, float]:
    """pid -> creation time of each descendant of ``pid``."""
    import psutil
    found = {}
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                found[child.pid] = child.create_time()
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # started with start_new_session: pgid == pid
    except ProcessLookupError:
        pass
