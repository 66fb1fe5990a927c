"""One MLflow system-metrics monitor per node, kept alive across tracking-server outages.

MLflow's ``SystemMetricsMonitor`` logs CPU, memory, disk, network (and GPU where ``nvidia-ml-py`` is
installed: ``pip install 'far-scale[gpu]'``) as ``system/<node_id>/...``; its thread returns at the first
failed call to the server and never comes back. ``NodeSystemMetrics.ensure_running`` (called at every log
interval) starts a fresh monitor, resuming the step count, once the server answers again.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from typing import Optional

log = logging.getLogger("far_scale.tracking")

DEFAULT_SAMPLING_INTERVAL_S = 10.0
HEALTH_TIMEOUT_S = 2.0


def node_index() -> int:
    """This process's node: torchrun's GROUP_RANK, SLURM's node id, else rank // local world size."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if name in os.environ:
            return int(os.environ[name])
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return rank // max(local, 1)


def is_server(uri: str) -> bool:
    """A tracking URI served over HTTP (it can be down and come back), not a local store."""
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str) -> bool:
    """True for a local store or a server whose /health answers."""
    if not is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as response:
            return response.status == 200
    except OSError:
        return False


class NodeSystemMetrics:
    def __init__(self, uri: str, run_id: str, node_id: str, sampling_interval_s: float = DEFAULT_SAMPLING_INTERVAL_S):
        self.uri, self.run_id, self.node_id = uri, run_id, node_id
        self.sampling_interval_s = sampling_interval_s
        self.restarts = 0
        self._monitor = None
        self._finished = False

    @property
    def running(self) -> bool:
        thread = getattr(self._monitor, "_process", None)
        return thread is not None and thread.is_alive()

    def ensure_running(self) -> bool:
        """Start the monitor if it is not running and the server answers; True if one was (re)started."""
        if self._finished or self.running or not server_answers(self.uri):
            return False
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.sampling_interval_s,
                resume_logging=True,
                node_id=self.node_id,
                tracking_uri=self.uri,
            )
            monitor.start()
        except Exception as exc:  # never fatal to training
            log.warning("MLflow system metrics for %s unavailable: %s", self.node_id, exc)
            return False
        if self._monitor is not None:
            self.restarts += 1
            log.warning("MLflow system metrics for %s restarted after the tracking server came back", self.node_id)
        self._monitor = monitor
        return True

    def finish(self) -> None:
        self._finished = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:
                log.warning("stopping MLflow system metrics failed: %s", exc)
            self._monitor = None


def start_node_metrics(uri: str, run_id: Optional[str], sampling_interval_s: float) -> Optional[NodeSystemMetrics]:
    """This node's monitor (call on each node's local rank 0), or None without a run."""
    if not run_id:
        return None
    metrics = NodeSystemMetrics(uri, run_id, f"node{node_index()}", sampling_interval_s)
    metrics.ensure_running()
    return metrics
