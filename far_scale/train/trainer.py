"""The training loop: streamed latent batches -> DeepSpeed ZeRO step -> EMA -> logs, samples, checkpoints.

One loop for every arch and world size. Model randomness (mask ratios, orders, noise and
time draws, class dropout) is seeded per micro-batch from (seed, step, global micro-batch
index), so a resumed run reproduces the uninterrupted one bit for bit, and a run with W
ranks draws what a 1-rank run with W-fold accumulation draws.
"""

from __future__ import annotations

import json
import logging
import signal
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
from far_scale.data.loader import LatentBatch, LatentLoader
from far_scale.data.manifest import read_manifest
from far_scale.data.storage import write_atomic
from far_scale.distributed import engine as ds
from far_scale.distributed.runtime import DistEnv, all_gather_objects, barrier
from far_scale.eval.evaluation import build_scorer, evaluate_on_ranks
from far_scale.eval.grid import save_image_atomic, tile
from far_scale.eval.image_generator import ImageGenerator, SamplingJob, sampling_options
from far_scale.planning.builder import build_model
from far_scale.planning.flops import peak_flops
from far_scale.planning.plan import derive_plan
from far_scale.train import checkpoint as ckpt
from far_scale.train.checkpointer import Checkpointer, Resume
from far_scale.train.ema import EMA
from far_scale.train.memory import peak_growth, report_memory
from far_scale.train.optim import parameter_groups, schedule_for
from far_scale.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, STOP_FILE
from far_scale.train.run_tracking import RunTracking
from far_scale.train.step_log import StepLog, StepTimes, write_line
from far_scale.train.target_network import TargetNetwork

log = logging.getLogger("far_scale.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
MIB = 2**20
GRID_FILE = "samples_step{step:08d}.png"
GRID_KEY = "samples"  # MLflow image key: one image per evaluation step


def micro_batch_seed(seed: int, step: int, global_micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, global_micro]).generate_state(1)[0])


class Trainer:
    """Set-up, micro-step, step and loop; the checkpoint protocol, the target network, tracking, the step
    records and evaluation are components it conducts (see docs/architecture.md)."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpointer = Checkpointer(cfg.checkpoint.url, self.run_dir, env, cfg.checkpoint.keep_last)
        self.tracking = RunTracking(cfg, self.run_dir, env)
        self.config_yaml = config_to_yaml(cfg)
        self.precision = cfg.parallel.precision if env.device.type == "cuda" else "fp32"
        self.step = 0
        self.nonfinite = 0
        self.stop_requested = False

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env, par = self.cfg, self.env, self.cfg.parallel
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            write_atomic(self.run_dir / ckpt.CONFIG_FILE, self.config_yaml)
        self.checkpointer.check_writable()
        manifest = read_manifest(cfg.data.url)
        # The one plan of this run: the same numbers check-config prints for this data and world size.
        self.plan = derive_plan(cfg, env.world_size, manifest.spec, manifest.shard_sizes, self.precision)
        self.accum, self.total_steps = self.plan.grad_accum_steps, self.plan.total_steps
        self.loader = LatentLoader(
            cfg.data.url,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.data.num_workers,
            batch_size=par.micro_batch_size_per_gpu,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
            split=cfg.data.split,
            grad_accum=self.accum,
            manifest=manifest,
            read_retry_s=cfg.data.read_retry_s,
            hflip=cfg.data.hflip,
        )
        self.data = self.loader.spec
        self.lr_at = schedule_for(cfg, self.plan.lr, self.plan.warmup_steps, self.total_steps)

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
        resume = self.checkpointer.locate(par.zero_stage)
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
        run_id = self._restore(resume) if resume is not None else None
        self.tracking.start(
            run_id,
            {"config": cfg.model_dump(mode="json"), "derived": self.plan.as_dict()},
            self.run_dir / ckpt.CONFIG_FILE,
        )
        self.codec = self._load_codec()
        self.scorer = build_scorer(cfg.eval, env.device)
        name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        self.step_log = StepLog(
            self.run_dir,
            env.is_main,
            env.device,
            self.lr_at,
            self.plan.samples_per_step,
            self.data.seq_len,
            env.world_size,
            self.plan.flops_per_image,
            peak_flops(name) if env.device.type == "cuda" else None,
        )
        self._print_plan(resume)

    def _load_codec(self):
        """The dataset's codec for decoding samples, or None (and a warning) when its weights are not here."""
        from far_scale.codecs import CodecError, load_manifest_codec

        try:
            return load_manifest_codec(self.loader.manifest.codec)
        except CodecError as exc:
            if self.env.is_main:
                log.warning("no samples or quality metrics during training: %s", exc)
            return None

    def _restore(self, resume: Resume):
        """Engine, step, data position, RNG and EMAs from ``resume``; returns its MLflow run id."""
        client = self.checkpointer.load(self.engine, resume, self.group_settings)
        self.step = int(client["step"])
        self.nonfinite = int(client.get("nonfinite", 0))
        warning = self.loader.restore(client["loader_positions"], self.env.rank, resume.resized)
        if not resume.resized:
            ckpt.restore_rng_state(client["rng_states"][self.env.rank])
        if warning and self.env.is_main:
            log.warning(warning)
        self.ema.load_full_state_dict(ckpt.load_ema(resume.ref.path))
        if self.targets.ema is not None:
            self.targets.load_full_state_dict(ckpt.load_ema(resume.ref.path, ckpt.TARGET_EMA_FILE))
        if self.env.is_main:
            log.warning("resumed from %s at step %d", resume.ref.path, self.step)
        return client.get("mlflow_run_id")

    def _print_plan(self, resume) -> None:
        if not self.env.is_main:
            return
        print(
            f"far-scale train: {self.cfg.model.arch} ({self.cfg.model.size}) on {self.env.world_size} x "
            f"{self.env.device.type}, {self.precision}, ZeRO-{self.cfg.parallel.zero_stage}; "
            f"{self.plan.samples_per_step} images/step = {self.cfg.parallel.micro_batch_size_per_gpu} x "
            f"{self.env.world_size} ranks x {self.accum} accumulation; {self.total_steps} steps; "
            f"peak lr {self.plan.lr:g}; data {self.cfg.data.url} ({self.data.seq_len} x {self.data.token_dim} "
            f"tokens, scale {self.loader.scale:.4f})" + (f"; resumed at step {self.step}" if resume else ""),
            flush=True,
        )
        target = self.targets.ema
        print(
            f"EMA on rank 0: {(self.ema.num_bytes() + self.targets.num_bytes()) / MIB:.2f} MiB of "
            f"{self.ema.full_num_bytes() / MIB:.2f} MiB (sharded over {self.env.world_size} rank(s)"
            + (f"; target network {target.num_bytes() / MIB:.2f} MiB, whole" if target else "")
            + ")",
            flush=True,
        )
        if self.built_partitioned:
            held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.engine.module.parameters())
            print(
                f"model built partitioned (ZeRO-3 zero.Init): rank 0 holds {held / MIB:.2f} MiB of weights; "
                f"at most {self.plan.construction_bytes / MIB:.2f} MiB of fp32 weights while building",
                flush=True,
            )

    # ---- one step ---------------------------------------------------------------------------------
    def _micro_step(self, batch: LatentBatch, micro: int):
        """Forward + backward of one micro-batch; returns (detached loss, parts) or (None, {}) if non-finite."""
        global_micro = self.env.rank * self.accum + micro
        torch.manual_seed(micro_batch_seed(self.cfg.run.seed, self.step, global_micro))
        latents = batch.latents.to(self.env.device, non_blocking=True)
        labels = batch.labels.to(self.env.device, non_blocking=True)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.engine(latents, labels, target_net=self.targets.net)
        loss = out["loss"]
        finite = torch.isfinite(loss.detach()).float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a sync point: every rank must agree to skip
        if finite.item() < 1.0:
            return None, {}
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), {k: v.detach() for k, v in out.items() if k != "loss"}

    def train_step(self, batches) -> tuple[float, dict, StepTimes]:
        """One optimizer step over ``accum`` finite micro-batches; returns mean loss over all ranks."""
        times = StepTimes()
        ds.set_learning_rate(self.engine, self.lr_at(self.step))
        losses, parts_sum, keys = [], {}, []
        micro = 0
        while micro < self.accum:
            start = time.perf_counter()
            batch = next(batches)
            times.data_s += time.perf_counter() - start
            start = time.perf_counter()
            loss, parts = self._micro_step(batch, micro)
            times.compute_s += time.perf_counter() - start
            if loss is None:
                self._count_nonfinite(batch)
                continue
            losses.append(loss)
            keys.extend(batch.keys)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            micro += 1
        start = time.perf_counter()
        self.ema.update()
        self.targets.update(self.step)  # self.step counts the completed steps before this one
        if self.env.is_main and (self.run_dir / STOP_FILE).exists():
            self.stop_requested = True
        names = sorted(parts_sum)
        summary = torch.stack(
            [
                torch.stack(losses).sum(),
                *[parts_sum[n] for n in names],
                torch.tensor(float(self.stop_requested), device=self.env.device),
            ]
        ).float()
        dist.all_reduce(summary)  # one collective per step: loss, its parts and any rank's stop request
        times.optimizer_s += time.perf_counter() - start
        count = self.accum * self.env.world_size
        self.stop_requested = bool(summary[-1].item() > 0)
        parts = {n: float(summary[1 + i]) / count for i, n in enumerate(names)}
        if self.cfg.run.record_sample_keys:
            with open(self.run_dir / f"sample_keys.rank{self.env.rank}.jsonl", "a") as handle:
                handle.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")
        self.step += 1
        return float(summary[0]) / count, parts, times

    def _count_nonfinite(self, batch: LatentBatch) -> None:
        self.nonfinite += 1
        limit = self.cfg.run.max_nonfinite_steps
        if self.env.is_main:
            log.warning(
                "non-finite loss at step %d (keys %s...); skipped (%d so far, limit %d)",
                self.step,
                batch.keys[:2],
                self.nonfinite,
                limit,
            )
        if self.nonfinite > limit:
            raise FloatingPointError(f"{self.nonfinite} non-finite losses exceed run.max_nonfinite_steps={limit}")

    # ---- the loop -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self.stop_requested = True
            log.warning("rank %d got signal %d: checkpointing after this step", self.env.rank, signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def train(self) -> int:
        """Run to ``total_steps`` or a stop request; returns the process exit code."""
        self._install_signal_handlers()
        batches = self.loader.batches()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.env.is_main and sys.stderr.isatty()),
        )
        try:
            while self.step < self.total_steps:
                loss, parts, times = self.train_step(batches)
                self.step_log.record(self.step, loss, parts, times)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % self.cfg.run.log_interval == 0 or self.step == self.total_steps:
                    self._log_interval(bar)
                if self.step % self.cfg.eval.interval_steps == 0:
                    self.evaluate()
                if self.stop_requested:
                    self.save()
                    self._mark_preempted()
                    return self._finish(EXIT_PREEMPTED, "KILLED", bar)
                if self.step % self.cfg.checkpoint.interval_steps == 0 and self.step < self.total_steps:
                    self.save()
            self.save()
            if self.step % self.cfg.eval.interval_steps:  # not just evaluated in the loop
                self.evaluate()
            return self._finish(0, "FINISHED", bar)
        except BaseException:
            bar.close()
            self.tracking.close("FAILED", wait=False)
            raise

    def _log_interval(self, bar) -> None:
        grad_norm = _grad_norm(self.engine) if self.env.is_main else None
        metrics = self.step_log.interval_metrics(self.step, grad_norm, self.nonfinite)
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

    def _mark_preempted(self) -> None:
        if not self.env.is_main:
            return
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        write_atomic(self.run_dir / PREEMPTED_MARKER, json.dumps({"step": self.step, "time": time.time()}))
        print(f"stopped on request at step {self.step} after a checkpoint; exit {EXIT_PREEMPTED}", flush=True)

    # ---- checkpoints and samples ----------------------------------------------------------------
    def save(self) -> None:
        """Collective checkpoint of engine, EMA, data position, RNG and run id; then the latest pointer."""
        positions = all_gather_objects(self.loader.position.as_dict())
        rngs = all_gather_objects(ckpt.full_rng_state())
        run_id = all_gather_objects(self.tracking.run_id)[0]
        client = {
            "step": self.step,
            "config_yaml": self.config_yaml,
            "loader_positions": positions,
            "rng_states": rngs,
            "mlflow_run_id": run_id,
            "world_size": self.env.world_size,
            "nonfinite": self.nonfinite,
        }
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        target_ema_state = self.targets.full_state_dict()
        meta = RunMeta(
            self.step,
            self.env.world_size,
            run_id,
            DataInfo(
                self.cfg.data.url,
                self.data.seq_len,
                self.data.token_dim,
                self.data.num_classes,
                self.loader.scale,
                dict(self.loader.manifest.codec),
            ),
        ).as_dict()
        location = self.checkpointer.save(
            self.engine, self.step, client, self.config_yaml, meta, ema_state, target_ema_state
        )
        self.tracking.set_tags({"checkpoint/latest": location, "checkpoint/step": self.step})

    def evaluate(self):
        """Sample with the EMA weights on every rank, score the images, log metrics and a grid (rank 0).

        With a quality metric (``eval.benchmark`` or Inception + reference statistics) ``eval.num_images``
        images are sampled, split over the ranks by batch; each rank scores its own images and only the
        features travel to rank 0. Without one, only the grid's images are sampled.
        """
        ev = self.cfg.eval
        if self.codec is None or (self.scorer is None and ev.grid_images == 0):
            return None
        state = self.ema.full_state_dict()  # collective under ZeRO-3
        model = build_model(self.cfg.model, self.data).to(self.env.device)
        model.load_state_dict(state)
        model.eval()
        options = sampling_options(ev, self.plan.dims.head_kind)
        generator = ImageGenerator(model, self.codec, self.loader.scale, options, self.env.device, self.precision)
        job = SamplingJob(
            ev.num_images if self.scorer else ev.grid_images, self.data.num_classes, ev.batch_size, self.cfg.run.seed
        )
        result = evaluate_on_ranks(
            generator, job, self.scorer, self.env.rank, self.env.world_size, all_gather_objects, ev.grid_images
        )
        del model, generator
        if result is None:
            return None
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        if metrics.get("eval/benchmark_valid") == 0.0:
            print(f"warning: {self.scorer.verdict.line()}: these scores cannot rank models", flush=True)
        self.tracking.log_metrics(metrics, self.step, flush=True)
        print(
            f"eval at step {self.step} ({job.num_images} images, K={options.num_iter}, head steps "
            f"{options.head_steps}, cfg {options.cfg_scale}): "
            + " ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items()),
            flush=True,
        )
        if result.grid:
            image = tile(np.stack(result.grid), self.data.num_classes)
            save_image_atomic(image, self.run_dir / GRID_FILE.format(step=self.step))
            self.tracking.log_image(np.asarray(image), GRID_KEY, self.step)
        return metrics


def _grad_norm(engine):
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None
