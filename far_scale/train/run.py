"""``far-scale train``: parse -> build -> train, on every rank of a torchrun/SLURM launch."""

from __future__ import annotations

import logging
from typing import Sequence

from far_scale.config.loader import load_config
from far_scale.distributed.runtime import init_distributed, shutdown


def configure_logging(rank: int) -> None:
    """Rank 0 logs info; every rank logs warnings, prefixed with its rank."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("DeepSpeed", "deepspeed", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_training(recipe: str, overrides: Sequence[str], allow_config_change: bool = False) -> int:
    cfg = load_config(recipe, overrides)
    env = init_distributed(cfg.run.device, cfg.parallel.process_group_timeout_min)
    configure_logging(env.rank)
    from far_scale.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, env, allow_config_change)
        trainer.setup()
        return trainer.train()
    finally:
        shutdown()
