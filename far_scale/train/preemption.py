"""The stop-and-requeue protocol shared by the trainer and the launchers (a leaf: nothing to import)."""

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; launchers requeue on it
STOP_FILE = "stop_request"  # touched by the SLURM batch script: checkpoint and exit EXIT_PREEMPTED
PREEMPTED_MARKER = "preempted.json"  # written on such an exit; the batch script requeues on it
