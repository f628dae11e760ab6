"""A `ray start --head` of a test's own: its temp dir, loopback, every port free-chosen; stopped by killing
exactly its processes (never `ray stop`, which would stop every Ray cluster of the machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adre_ray.distributed._common import free_local_port as free_port
from adre_ray.distributed._common import stop_processes

RAY = str(Path(sys.executable).parent / "ray")

__all__ = ["RAY", "free_port", "start_head", "stop_head"]


def start_head(temp_dir: str, env: dict[str, str], *, num_cpus: int, dashboard_port: int | None,
               attempts: int = 3) -> int | None:
    """``ray start --head`` writing its session and ``ray_current_cluster`` record under ``temp_dir``;
    the dashboard (job server, State API) on ``dashboard_port``, or none when it is None. A start that
    fails (on a loaded machine the dashboard can miss Ray's start deadline) is cleaned up and tried again
    with fresh ports, ``attempts`` times in all; then ``RuntimeError`` with Ray's output. Returns the
    dashboard port used (None without a dashboard)."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    for attempt in range(1, attempts + 1):
        dashboard, port = ["--include-dashboard=false"], None
        if dashboard_port is not None:
            port = dashboard_port if attempt == 1 else free_port()
            dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"]
        cmd = [RAY, "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1", *dashboard,
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               # every fixed default port moved, so another Ray on this machine cannot collide with it
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--ray-client-server-port={free_port()}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if done.returncode == 0:
            return port
        stop_head(temp_dir)
    raise RuntimeError(f"`ray start --head` failed {attempts} times; last output:\n"
                       f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def stop_head(temp_dir: str) -> None:
    """Terminate the processes of the head started with ``temp_dir`` (and their workers)."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (proc.info["cmdline"] or [])):
                victims.append(proc)
                victims.extend(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    stop_processes(victims)
