"""Stop requests of a run: a signal (SLURM's pre-emption warning, ``scancel --signal``, Ctrl-C) on any rank or
the stop file the batch script touches; after the checkpoint, the marker the launchers requeue on."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from far_scale.data.storage import write_atomic
from far_scale.distributed.runtime import DistEnv
from far_scale.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, STOP_FILE

log = logging.getLogger("far_scale.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """This rank's view; the trainer shares it with the other ranks in its one collective per step."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.run_dir, self.env = run_dir, env
        self.requested = False

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self.requested = True
            log.warning("rank %d got signal %d: checkpointing after this step", self.env.rank, signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def poll(self) -> bool:
        """This rank's request: a signal received, or (rank 0) the stop file present."""
        if self.env.is_main and (self.run_dir / STOP_FILE).exists():
            self.requested = True
        return self.requested

    def mark_preempted(self, step: int) -> None:
        """Rank 0, after the checkpoint: the stop file goes, the marker the batch script requeues on comes."""
        if not self.env.is_main:
            return
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        write_atomic(self.run_dir / PREEMPTED_MARKER, json.dumps({"step": step, "time": time.time()}))
        print(f"stopped on request at step {step} after a checkpoint; exit {EXIT_PREEMPTED}", flush=True)
