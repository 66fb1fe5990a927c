"""The training loop: streamed latent batches -> DeepSpeed ZeRO step -> EMA -> logs, samples, checkpoints.

One loop for every arch and world size. Model randomness (mask ratios, orders, noise and
time draws, class dropout) is seeded per micro-batch from (seed, step, global micro-batch
index), so a resumed run reproduces the uninterrupted one bit for bit, and a run with W
ranks draws what a 1-rank run with W-fold accumulation draws.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from far_scale.artifacts import DataInfo, RunMeta
from far_scale.config.loader import config_to_yaml
from far_scale.config.schema import Config
from far_scale.data.contract import MANIFEST_NAME
from far_scale.data.loader import LatentBatch, LatentLoader
from far_scale.data.manifest import read_manifest
from far_scale.data.storage import write_atomic
from far_scale.distributed import engine as ds
from far_scale.distributed.runtime import DistEnv, barrier, configure_math
from far_scale.models.compile import compile_model
from far_scale.planning.builder import build_model
from far_scale.planning.plan import DataSource, plan_for
from far_scale.train import checkpoint as ckpt
from far_scale.train.checkpointer import Checkpointer
from far_scale.train.config_drift import check_resume, record_changes
from far_scale.train.ema import EMA
from far_scale.train.evaluator import TrainingEvaluator
from far_scale.train.memory import peak_growth, report_memory
from far_scale.train.optim import parameter_groups, schedule_for
from far_scale.train.posthoc import PosthocEMAs
from far_scale.train.preemption import EXIT_PREEMPTED
from far_scale.train.run_banner import run_banner
from far_scale.train.run_tracking import RunTracking, checkpoint_params
from far_scale.train.step_log import NonfiniteSteps, StepLog, StepTimes, write_line
from far_scale.train.stop_requests import StopRequests
from far_scale.train.target_network import TargetNetwork

log = logging.getLogger("far_scale.train")


def micro_batch_seed(seed: int, step: int, global_micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, global_micro]).generate_state(1)[0])


class Trainer:
    """Set-up, micro-step, step and loop; the checkpoint protocol, the target network, tracking, the step
    records and evaluation are components it conducts (see docs/architecture.md)."""

    def __init__(self, cfg: Config, env: DistEnv, allow_config_change: bool = False):
        self.cfg, self.env = cfg, env
        self.allow_config_change = allow_config_change
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpointer = Checkpointer(cfg.checkpoint.url, self.run_dir, env, cfg.checkpoint.keep_last)
        self.tracking = RunTracking(cfg, self.run_dir, env)
        self.config_yaml = config_to_yaml(cfg)
        self.precision = cfg.parallel.precision if env.device.type == "cuda" else "fp32"
        self.step = 0
        self.nonfinite = NonfiniteSteps(cfg.run.max_nonfinite_steps, env.is_main)
        self.stops = StopRequests(self.run_dir, env)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env, par = self.cfg, self.env, self.cfg.parallel
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer.check_writable()
        manifest = read_manifest(cfg.data.url)
        source = DataSource.from_manifest(manifest, f"{cfg.data.url.rstrip('/')}/{MANIFEST_NAME}", cfg.data.normalize)
        # The one plan of this run: the same numbers check-config prints for this data and world size.
        self.plan = plan_for(cfg, env.world_size, source, self.precision)
        self.accum, self.total_steps = self.plan.grad_accum_steps, self.plan.total_steps
        self.loader = LatentLoader(
            cfg.data.url,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.data.num_workers,
            batch_size=self.plan.micro_batch,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
            split=cfg.data.split,
            grad_accum=self.accum,
            manifest=manifest,
            read_retry_s=cfg.data.read_retry_s,
            hflip=cfg.data.hflip,
            normalize=cfg.data.normalize,
        )
        self.data = self.loader.spec
        spec, normalization = self.data, self.loader.normalization
        codec = dict(manifest.codec)
        self.data_info = DataInfo(
            cfg.data.url,
            spec.seq_len,
            spec.token_dim,
            spec.num_classes,
            manifest.scale,
            codec,
            normalization.as_dict(),
            manifest.content_digest,
        )
        self.lr_at = schedule_for(cfg, self.plan.lr, self.plan.warmup_steps, self.total_steps)

        configure_math(par.tf32)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        ds.configure_deepspeed(env.device)  # imported first: its libraries are not the model build's memory
        with peak_growth(env.device) as self.build_memory:
            if self.plan.built_partitioned:  # ZeRO-3: no rank ever holds the whole model (same weights)
                model = ds.build_partitioned(
                    lambda: build_model(cfg.model, self.data), self.plan.deepspeed_config, env.device
                )
            else:
                model = build_model(cfg.model, self.data)
        # Observed, not planned: recorded in memory.json.
        self.built_partitioned = all(ds.is_partitioned(p) for p in model.parameters())
        self.targets = TargetNetwork.prepare(cfg.model, self.data, self.plan.dims.head_kind, env.device)
        if par.activation_checkpointing:
            ds.apply_activation_checkpointing(model)
        if par.compile:
            compile_model(model)
        resume = self.checkpointer.locate(par.zero_stage)
        # A resume under another recipe is refused (every rank raises alike) before config.yaml is rewritten.
        changes = (
            check_resume(resume.ref.path, cfg, manifest.content_digest, self.allow_config_change) if resume else {}
        )
        if env.is_main:
            write_atomic(self.run_dir / ckpt.CONFIG_FILE, self.config_yaml)
        groups = parameter_groups(model, cfg.optim.weight_decay)
        self.group_settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        self.engine = ds.build_engine(
            model,
            self.plan.deepspeed_config,
            cfg.optim,
            env.device,
            groups,
            self.lr_at(0),
            load_universal=resume is not None and resume.universal,
        )
        # Sharded over the ranks; whole only where a network runs on it (the target network).
        self.ema = EMA(self.engine.module, cfg.optim.ema_decay, whole_prefix=self.targets.eval_ema_whole_prefix)
        self.targets.attach(self.engine.module, self.ema)
        self.posthoc = PosthocEMAs.build(self.engine.module, cfg.ema.posthoc)  # None unless ema.posthoc.enabled
        run_id = None
        if resume is not None:
            self.step, self.nonfinite.count, run_id = self.checkpointer.restore(
                self.engine, resume, self.group_settings, self.loader, self.ema, self.targets, self.posthoc
            )
        self.tracking.start(
            run_id,
            {"config": cfg.model_dump(mode="json"), "derived": self.plan.as_dict()},
            self.run_dir / ckpt.CONFIG_FILE,
        )
        self.model_params = checkpoint_params(cfg, self.plan)
        self.tracking.log_dataset(cfg.data.url, manifest)
        if resume is not None and env.is_main:
            self.tracking.record_stored(self.checkpointer.stored(), self.model_params)
        if changes and env.is_main:
            record = record_changes(self.run_dir, self.step, changes)
            self.tracking.set_tags(record["tags"])
            self.tracking.log_params(record["params"])
            print(f"config changed on resume at step {self.step}: {', '.join(changes)} (recorded)", flush=True)
        self.evaluator = TrainingEvaluator(cfg, env, self.plan, self.data, self.data_info, self.run_dir, self.tracking)
        self.step_log = StepLog.for_run(self.run_dir, env, self.lr_at, self.plan, self.data.seq_len)
        self._print_plan(resume)

    def _print_plan(self, resume) -> None:
        if self.env.is_main:
            module = self.engine.module if self.built_partitioned else None
            args = (self.env.device.type, self.data, self.loader.normalization, self.step if resume else None)
            for line in run_banner(self.cfg, self.plan, *args, self.ema, self.targets, module):
                print(line, flush=True)

    # ---- one step ---------------------------------------------------------------------------------
    def _micro_step(self, batch: LatentBatch, micro: int):
        """Forward + backward of one micro-batch; returns the detached loss and its parts (device tensors).

        Nothing here waits for the device: whether the loss was finite is decided once per step."""
        global_micro = self.env.rank * self.accum + micro
        torch.manual_seed(micro_batch_seed(self.cfg.run.seed, self.step, global_micro))
        latents = batch.latents.to(self.env.device, non_blocking=True)
        labels = batch.labels.to(self.env.device, non_blocking=True)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.engine(latents, labels, target_net=self.targets.net)
        self.engine.backward(out["loss"])
        if micro < self.accum - 1:
            self.engine.step()  # inside the accumulation: DeepSpeed only counts it
        return out["loss"].detach(), {k: v.detach() for k, v in out.items() if k != "loss"}

    def train_step(self, batches) -> tuple[float, dict, StepTimes]:
        """One optimizer step over ``accum`` micro-batches per rank; returns the mean loss over all ranks.

        One collective and one device-to-host transfer per step carry the loss, its parts, the count of
        non-finite micro-batches and any rank's stop request. A step with a non-finite loss on any rank is
        skipped on every rank (no update of weights, optimizer states or EMAs) and counted.
        """
        times = StepTimes()
        ds.set_learning_rate(self.engine, self.lr_at(self.step))
        losses, parts, keys = [], [], []
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = next(batches)
            times.data_s += time.perf_counter() - start
            start = time.perf_counter()
            loss, out = self._micro_step(batch, micro)
            times.compute_s += time.perf_counter() - start
            losses.append(loss)
            parts.append(out)
            keys.extend(batch.keys)
        start = time.perf_counter()
        names = sorted(parts[0])
        finite = torch.stack([torch.isfinite(loss) for loss in losses]).float()
        per_micro = torch.stack([torch.stack([loss, *[p[n] for n in names]]) for loss, p in zip(losses, parts)])
        sums = torch.where(finite[:, None] > 0, per_micro.float(), 0.0).sum(0)
        stop = torch.tensor([float(self.stops.poll())], device=self.env.device)
        summary = torch.cat([sums, (1.0 - finite).sum()[None], finite.sum()[None], stop])
        dist.all_reduce(summary)  # the step's one collective: loss, parts, non-finite count, stop requests
        values = summary.tolist()  # the step's one wait for the device
        nonfinite, counted, self.stops.requested = values[-3], values[-2], values[-1] > 0
        ds.optimizer_step(self.engine, apply=nonfinite == 0)
        if nonfinite == 0:
            self.ema.update()
            self.targets.update(self.step)  # self.step counts the completed steps before this one
            if self.posthoc is not None:
                self.posthoc.update(self.step + 1)
        else:
            self.nonfinite.record(self.step, int(nonfinite), keys)
        times.optimizer_s += time.perf_counter() - start
        if self.cfg.run.record_sample_keys:
            with open(self.run_dir / f"sample_keys.rank{self.env.rank}.jsonl", "a") as handle:
                handle.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")
        self.step += 1
        if counted == 0:  # every micro-batch on every rank was non-finite
            return math.nan, {}, times
        return values[0] / counted, {n: values[1 + i] / counted for i, n in enumerate(names)}, times

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to ``total_steps`` or a stop request; returns the process exit code."""
        self.stops.install_signal_handlers()
        batches = self.loader.batches()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.env.is_main and sys.stderr.isatty()),
        )
        started_at = self.step
        try:
            while self.step < self.total_steps:
                loss, parts, times = self.train_step(batches)
                self.step_log.record(self.step, loss, parts, times)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % self.cfg.run.log_interval == 0 or self.step == self.total_steps:
                    self._log_interval(bar)
                if self.posthoc is not None and self.posthoc.due(self.step, self.total_steps):
                    self.checkpointer.save_snapshot(self.step, *self.posthoc.snapshot(self.step))
                # A checkpoint due at this step (the last one included) is saved before the evaluation, so that
                # the evaluation's metrics are those of a logged checkpoint model (MLflow: metrics with its model_id).
                final = self.step == self.total_steps
                # Agreed by every rank in this step's collective; a signal that arrives during the evaluation below
                # sets only its own rank's flag, and counts at the next step's collective (one more step, then stop).
                stop = self.stops.requested
                if stop or final or self.step % self.cfg.checkpoint.interval_steps == 0:
                    self.save()
                if final or self.step % self.cfg.eval.interval_steps == 0:
                    self.evaluate()
                if stop:
                    self.stops.mark_preempted(self.step)
                    return self._finish(EXIT_PREEMPTED, "KILLED", bar)
            if self.step == started_at:  # resumed at the end: nothing trained, the final checkpoint written again
                self.save()
                if self.step % self.cfg.eval.interval_steps:
                    self.evaluate()
            return self._finish(0, "FINISHED", bar)
        except BaseException:
            bar.close()
            self.tracking.close("FAILED", wait=False)
            raise

    def _log_interval(self, bar) -> None:
        grad_norm = _grad_norm(self.engine) if self.env.is_main else None
        metrics = self.step_log.interval_metrics(self.step, grad_norm, self.nonfinite.count)
        if metrics is not None:
            self.tracking.log_metrics(metrics, self.step, flush=True)
            write_line(bar, self.step_log.line(metrics, self.step, self.total_steps))
        self.tracking.keep_alive()

    def _finish(self, code: int, status: str, bar) -> int:
        """Close the bar and the MLflow run, then leave together: under `srun --kill-on-bad-exit` the first
        rank to exit non-zero ends the others, so nothing may remain to be done after this barrier."""
        bar.close()
        memory = report_memory(
            self.env,
            self.build_memory,
            self.plan.memory.total,
            self.plan.construction_bytes,
            self.cfg.parallel.zero_stage,
            self.built_partitioned,
            self.run_dir,
        )
        if memory is not None:
            self.tracking.log_metrics(memory, self.step)
        self.tracking.close(status, wait=code != EXIT_PREEMPTED)
        barrier()
        return code

    # ---- checkpoints and samples ----------------------------------------------------------------
    def save(self) -> None:
        """Collective checkpoint of engine, EMAs, data positions, RNGs and run id; then the latest pointer (none with
        ``checkpoint.enabled: false``)."""
        if not self.cfg.checkpoint.enabled:
            return
        client = self.checkpointer.client_state(
            self.step, self.config_yaml, self.loader.position.as_dict(), self.tracking.run_id, self.nonfinite.count
        )
        meta = RunMeta(self.step, self.env.world_size, client["mlflow_run_id"], self.data_info).as_dict()
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        target_ema_state = self.targets.full_state_dict()
        posthoc_state = self.posthoc.checkpoint_state() if self.posthoc is not None else None
        saved = self.checkpointer.save(
            self.engine, self.step, client, self.config_yaml, meta, ema_state, target_ema_state, posthoc_state
        )
        self.tracking.set_tags({"checkpoint/latest": saved.location, "checkpoint/step": self.step})
        self.tracking.record_checkpoint(saved, self.model_params)

    def evaluate(self):
        return self.evaluator(self.step, self.ema.full_state_dict)


def _grad_norm(engine):
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None
