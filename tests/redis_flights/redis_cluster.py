"""A real Redis Cluster on loopback: three masters (``redis-server --cluster-enabled yes``)
joined by ``redis-cli --cluster create``, for the cluster tests of RedisFlights and the backend.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RedisCluster3"]


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port < 55000 and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    def __init__(self, workdir: Path | None = None) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server / redis-cli not found: run scripts/ensure_redis.sh")
        self.server, self.cli = server, cli
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="chengeta-cluster-"))
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30.0) -> None:
        for _ in range(3):
            port = _cluster_port()
            d = self.workdir / str(port)
            d.mkdir(parents=True)
            argv = [
                *(self.server, "--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--save", "", "--appendonly", "no", "--dir", str(d)),
                *("--protected-mode", "no", "--loglevel", "warning"),
            ]
            self.procs.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while self._cli(port, "ping") != "PONG":
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"cluster node {port} did not start")
                time.sleep(0.02)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        for port in self.ports:
            while "cluster_state:ok" not in self._cli(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the cluster did not become ok")
                time.sleep(0.05)

    def _cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            [self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs = []
