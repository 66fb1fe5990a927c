"""The training loop: streamed latent batches -> DeepSpeed ZeRO step -> EMA -> logs, samples, checkpoints.

One loop for every arch and world size. Model randomness (mask ratios, orders, noise and
time draws, class dropout) is seeded per micro-batch from (seed, step, global micro-batch
index), so a resumed run reproduces the uninterrupted one bit for bit, and a run with W
ranks draws what a 1-rank run with W-fold accumulation draws.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from far_scale.config.loader import config_to_yaml
from far_scale.config.schema import Config
from far_scale.data.loader import LatentBatch, LatentLoader, LoaderPosition
from far_scale.data.manifest import read_manifest
from far_scale.data.storage import write_atomic
from far_scale.distributed import engine as ds
from far_scale.distributed.runtime import DistEnv, all_gather_objects, barrier
from far_scale.eval.grid import save_image_atomic, tile
from far_scale.eval.sampler import ImageGenerator, SamplingJob, iter_rank_batches, sampling_options
from far_scale.eval.scoring import build_scorer, concat_features
from far_scale.models.model import TARGET_NET_PREFIX
from far_scale.planning.builder import build_meta_model, build_model
from far_scale.planning.flops import peak_flops
from far_scale.planning.plan import derive_plan
from far_scale.tracking.mlflow_tracker import Tracker, default_tracking_uri
from far_scale.tracking.system_metrics import NodeSystemMetrics, start_node_metrics
from far_scale.train import checkpoint as ckpt
from far_scale.train.ema import EMA, ramped_decay
from far_scale.train.memory import GIB, peak_bytes, peak_growth
from far_scale.train.optim import parameter_groups, schedule_for
from far_scale.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, STOP_FILE
from far_scale.train.remote_checkpoints import RemoteCheckpoints, is_remote, local_directory

log = logging.getLogger("far_scale.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
METRICS_FILE = "metrics.jsonl"
MEMORY_FILE = "memory.json"  # per-rank peak memory and model-build growth, written when a run ends
UNSENT_METRICS_FILE = "mlflow_unsent.jsonl"  # metrics an unreachable tracking server never received
MIB = 2**20
GRID_FILE = "samples_step{step:08d}.png"
GRID_KEY = "samples"  # MLflow image key: one image per evaluation step


def micro_batch_seed(seed: int, step: int, global_micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, global_micro]).generate_state(1)[0])


@dataclass
class StepTimes:
    data_s: float = 0.0
    compute_s: float = 0.0
    optimizer_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.data_s + self.compute_s + self.optimizer_s


@dataclass
class Window:
    """Accumulates metrics between two log lines."""

    steps: int = 0
    loss_sum: float = 0.0
    parts: dict = field(default_factory=dict)
    times: StepTimes = field(default_factory=StepTimes)

    def add(self, loss: float, parts: dict, times: StepTimes) -> None:
        self.steps += 1
        self.loss_sum += loss
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + value
        self.times.data_s += times.data_s
        self.times.compute_s += times.compute_s
        self.times.optimizer_s += times.optimizer_s


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        url = cfg.checkpoint.url
        # On an object store, DeepSpeed writes to a local staging directory that is mirrored to the store.
        self.remote = RemoteCheckpoints(url, self.run_dir / "checkpoints") if is_remote(url) else None
        self.ckpt_dir = local_directory(url) if url and self.remote is None else self.run_dir / "checkpoints"
        self.config_yaml = config_to_yaml(cfg)
        self.precision = cfg.parallel.precision if env.device.type == "cuda" else "fp32"
        self.step = 0
        self.nonfinite = 0
        self.stop_requested = False
        self.tracker: Optional[Tracker] = None
        self.node_metrics: Optional[NodeSystemMetrics] = None

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            write_atomic(self.run_dir / "config.yaml", self.config_yaml)
        ckpt.check_writable(self.ckpt_dir)
        par = cfg.parallel
        manifest = read_manifest(cfg.data.url)
        # The one plan of this run: the same numbers check-config prints for this data and world size.
        self.plan = derive_plan(cfg, env.world_size, manifest.spec, manifest.shard_sizes, self.precision)
        self.accum = self.plan.grad_accum_steps
        self.total_steps = self.plan.total_steps
        self.loader = LatentLoader(cfg.data.url, rank=env.rank, world_size=env.world_size,
                                   num_workers=cfg.data.num_workers, batch_size=par.micro_batch_size_per_gpu,
                                   seed=cfg.run.seed, shuffle=cfg.data.shuffle, split=cfg.data.split,
                                   grad_accum=self.accum, manifest=manifest, read_retry_s=cfg.data.read_retry_s,
                                   hflip=cfg.data.hflip)
        self.data = self.loader.spec
        self.lr_at = schedule_for(cfg, self.plan.lr, self.plan.warmup_steps, self.total_steps)

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        ds.configure_deepspeed(env.device)  # imported first: its libraries are not the model build's memory
        with peak_growth(env.device) as self.build_memory:
            if self.plan.built_partitioned:  # ZeRO-3: no rank ever holds the whole model (same weights)
                model = ds.build_partitioned(lambda: build_model(cfg.model, self.data), self.plan.deepspeed_config,
                                             env.device)
            else:
                model = build_model(cfg.model, self.data)
        # Observed, not planned: recorded in memory.json.
        self.built_partitioned = all(ds.is_partitioned(p) for p in model.parameters())
        self.dims = self.plan.dims
        target_kind = cfg.model.head.consistency_target if self.dims.head_kind == "shortcut" else "live"
        # The network the bootstrap targets run on: the head's MLP, unpartitioned, its weights bound to an EMA
        # below (built on the meta device and allocated empty: no generator draws, no values copied).
        target_template = (build_meta_model(cfg.model, self.data).head.net.to_empty(device=env.device)
                           if target_kind != "live" else None)
        if par.activation_checkpointing:
            ds.apply_activation_checkpointing(model)
        resume = self._find_checkpoint()
        resized = resume is not None and resume.world_size != env.world_size
        # ZeRO-0 checkpoints hold whole model and optimizer states (DeepSpeed's universal format does not
        # support them, and they need no conversion); sharded stages go through the universal format.
        universal = resized and par.zero_stage > 0
        if universal:
            self._convert_to_universal(resume)
        elif resized and env.is_main:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: ZeRO-0 states are whole, "
                        "loading them directly", resume.tag, resume.world_size, env.world_size)
        groups = parameter_groups(model, cfg.optim.weight_decay)
        self.group_settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        self.engine = ds.build_engine(model, self.plan.deepspeed_config, cfg.optim, env.device, groups,
                                      self.lr_at(0), load_universal=universal)
        # Sharded over the ranks; whole only where a network runs on it (the target network).
        self.ema = EMA(self.engine.module, cfg.optim.ema_decay,
                       whole_prefix=TARGET_NET_PREFIX if target_kind == "eval_ema" else None)
        # The target EMA (consistency_target: ema) covers the head's MLP only, with a decay of its own.
        self.target_ema = (EMA(self.engine.module, cfg.model.head.target_ema_decay, prefix=TARGET_NET_PREFIX,
                               whole_prefix=TARGET_NET_PREFIX) if target_kind == "ema" else None)
        target_source = self.target_ema if target_kind == "ema" else self.ema
        self.target_net = (target_source.bind(target_template, TARGET_NET_PREFIX)
                           if target_template is not None else None)
        run_id = None
        if resume is not None:
            run_id = self._restore(resume, universal, resized)
        if env.is_main:
            self._start_tracking(run_id)
        self._start_node_metrics()
        self.codec = self._load_codec()
        self.scorer = build_scorer(cfg.eval, env.device)
        name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        self.peak = peak_flops(name) if env.device.type == "cuda" else None
        self._print_plan(resume)

    def _tracking_uri(self) -> str:
        return self.cfg.tracking.uri or default_tracking_uri(self.run_dir)

    def _start_node_metrics(self) -> None:
        """System metrics from each node's local rank 0 into rank 0's MLflow run (a collective)."""
        run_id = all_gather_objects(self.tracker.run_id if self.tracker is not None else None)[0]
        tracking = self.cfg.tracking
        if self.env.local_rank == 0 and tracking.enabled and tracking.system_metrics:
            self.node_metrics = start_node_metrics(self._tracking_uri(), run_id, tracking.system_metrics_interval_s)

    def _keep_node_metrics(self) -> None:
        """Restart this node's monitor after a server outage; on rank 0 start it once the run exists."""
        if self.node_metrics is not None:
            self.node_metrics.ensure_running()
        elif self.env.is_main and self.tracker.run_id and self.cfg.tracking.system_metrics:
            self.node_metrics = start_node_metrics(self._tracking_uri(), self.tracker.run_id,
                                                   self.cfg.tracking.system_metrics_interval_s)

    def _load_codec(self):
        """The dataset's codec for decoding samples, or None (and a warning) when its weights are not here."""
        from far_scale.codecs import CodecError, load_manifest_codec

        try:
            return load_manifest_codec(self.loader.manifest.codec)
        except CodecError as exc:
            if self.env.is_main:
                log.warning("no samples or quality metrics during training: %s", exc)
            return None

    def _find_checkpoint(self) -> Optional[ckpt.CheckpointRef]:
        """The checkpoint to resume from: the local ``latest.json``, or the store's (downloaded by each
        node's local rank 0 into the staging directory, so a machine with an empty disk resumes)."""
        ref = ckpt.read_latest(self.ckpt_dir) if self.remote is None else self.remote.latest()
        if ref is not None and self.env.local_rank == 0:
            # Verified before DeepSpeed unpickles anything (fetch verifies what it keeps or downloads).
            if self.remote is not None:
                self.remote.fetch(ref)
            else:
                ckpt.verify_checkpoint(ref)
        barrier()
        return ref

    def _convert_to_universal(self, resume: ckpt.CheckpointRef) -> None:
        if self.env.is_main:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: converting it to DeepSpeed's "
                        "universal format", resume.tag, resume.world_size, self.env.world_size)
            ds.convert_to_universal(str(resume.directory), resume.tag, str(resume.directory / ckpt.UNIVERSAL_DIR))
        barrier()

    def _restore(self, ref: ckpt.CheckpointRef, universal: bool, resized: bool) -> Optional[str]:
        directory = ref.directory / ckpt.UNIVERSAL_DIR if universal else ref.directory
        client = ds.load_checkpoint(self.engine, str(directory), ref.tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ref.path}")
        if universal:
            ds.restore_group_settings(self.engine, self.group_settings)
        self.step = int(client["step"])
        self.nonfinite = int(client.get("nonfinite", 0))
        positions = client["loader_positions"]
        workers = max(self.cfg.data.num_workers, 1)
        if not resized:
            self.loader.position = LoaderPosition.from_dict(positions[self.env.rank])
            ckpt.restore_rng_state(client["rng_states"][self.env.rank])
        elif self.cfg.data.split == "samples":
            saved = LoaderPosition.from_dict(positions[0])
            self.loader.position = LoaderPosition(saved.epoch, [0] * workers, saved.global_micro_batches)
        else:
            saved = LoaderPosition.from_dict(positions[0])
            self.loader.position = LoaderPosition(saved.epoch + 1, [0] * workers)
            if self.env.is_main:
                log.warning("world size changed with data.split=shards: the interrupted epoch's remaining samples "
                            "cannot be located exactly; continuing at the start of epoch %d", saved.epoch + 1)
        self.ema.load_full_state_dict(ckpt.load_ema(ref.path))
        if self.target_ema is not None:
            self.target_ema.load_full_state_dict(ckpt.load_ema(ref.path, ckpt.TARGET_EMA_FILE))
        if self.env.is_main:
            log.warning("resumed from %s at step %d", ref.path, self.step)
        return client.get("mlflow_run_id")

    def _start_tracking(self, run_id: Optional[str]) -> None:
        tracking = self.cfg.tracking
        self.tracker = Tracker(self._tracking_uri(), tracking.experiment, tracking.run_name or self.cfg.run.name,
                               self.run_dir / "mlartifacts", run_id=run_id, enabled=tracking.enabled,
                               final_flush_timeout_s=tracking.final_flush_timeout_s,
                               unsent_path=self.run_dir / UNSENT_METRICS_FILE)
        if run_id is None:
            self.tracker.log_params({"config": self.cfg.model_dump(mode="json"),
                                     "derived": self.plan.as_dict()})
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.set_tags({"run_dir": str(self.run_dir.resolve()), "world_size": self.env.world_size})

    def _print_plan(self, resume) -> None:
        if not self.env.is_main:
            return
        print(f"far-scale train: {self.cfg.model.arch} ({self.cfg.model.size}) on {self.env.world_size} x "
              f"{self.env.device.type}, {self.precision}, ZeRO-{self.cfg.parallel.zero_stage}; "
              f"{self.plan.samples_per_step} images/step = {self.cfg.parallel.micro_batch_size_per_gpu} x "
              f"{self.env.world_size} ranks x {self.accum} accumulation; {self.total_steps} steps; "
              f"peak lr {self.plan.lr:g}; data {self.cfg.data.url} ({self.data.seq_len} x {self.data.token_dim} "
              f"tokens, scale {self.loader.scale:.4f})"
              + (f"; resumed at step {self.step}" if resume else ""), flush=True)
        ema_bytes = self.ema.num_bytes() + (self.target_ema.num_bytes() if self.target_ema is not None else 0)
        print(f"EMA on rank 0: {ema_bytes / MIB:.2f} MiB of {self.ema.full_num_bytes() / MIB:.2f} MiB "
              f"(sharded over {self.env.world_size} rank(s)"
              + (f"; target network {self.target_ema.num_bytes() / MIB:.2f} MiB, whole" if self.target_ema else "")
              + ")", flush=True)
        if self.built_partitioned:
            held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.engine.module.parameters())
            print(f"model built partitioned (ZeRO-3 zero.Init): rank 0 holds {held / MIB:.2f} MiB of weights; "
                  f"at most {self.plan.construction_bytes / MIB:.2f} MiB of fp32 weights while building", flush=True)

    # ---- one step ---------------------------------------------------------------------------------
    def _micro_step(self, batch: LatentBatch, micro: int) -> tuple[Optional[torch.Tensor], dict]:
        """Forward + backward of one micro-batch; returns (detached loss, parts) or (None, {}) if non-finite."""
        global_micro = self.env.rank * self.accum + micro
        torch.manual_seed(micro_batch_seed(self.cfg.run.seed, self.step, global_micro))
        latents = batch.latents.to(self.env.device, non_blocking=True)
        labels = batch.labels.to(self.env.device, non_blocking=True)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.engine(latents, labels, target_net=self.target_net)
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
                self.nonfinite += 1
                if self.env.is_main:
                    log.warning("non-finite loss at step %d (keys %s...); skipped (%d so far, limit %d)",
                                self.step, batch.keys[:2], self.nonfinite, self.cfg.run.max_nonfinite_steps)
                if self.nonfinite > self.cfg.run.max_nonfinite_steps:
                    raise FloatingPointError(f"{self.nonfinite} non-finite losses exceed "
                                             f"run.max_nonfinite_steps={self.cfg.run.max_nonfinite_steps}")
                continue
            losses.append(loss)
            keys.extend(batch.keys)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            micro += 1
        start = time.perf_counter()
        self.ema.update()
        if self.target_ema is not None:
            head = self.cfg.model.head
            # self.step counts completed steps before this one: the ramp starts at decay 0.
            self.target_ema.update(ramped_decay(head.target_ema_decay, self.step, head.target_ema_warmup_steps))
        if self.env.is_main and (self.run_dir / STOP_FILE).exists():
            self.stop_requested = True
        names = sorted(parts_sum)
        summary = torch.stack([torch.stack(losses).sum(), *[parts_sum[n] for n in names],
                               torch.tensor(float(self.stop_requested), device=self.env.device)]).float()
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
        window = Window()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.env.is_main and sys.stderr.isatty()))
        try:
            while self.step < self.total_steps:
                loss, parts, times = self.train_step(batches)
                window.add(loss, parts, times)
                self._write_metrics_line(loss, parts, times)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % self.cfg.run.log_interval == 0 or self.step == self.total_steps:
                    self._log_window(window, bar)
                    self._keep_node_metrics()
                    window = Window()
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
            if self.node_metrics is not None:
                self.node_metrics.finish()
            if self.tracker is not None:
                self.tracker.close("FAILED", wait=False)
            raise

    def _finish(self, code: int, status: str, bar) -> int:
        """Close the bar and the MLflow run, then leave together: under `srun --kill-on-bad-exit` the first
        rank to exit non-zero ends the others, so nothing may remain to be done after this barrier."""
        bar.close()
        self._record_memory()
        if self.node_metrics is not None:
            self.node_metrics.finish()
        if self.tracker is not None:
            self.tracker.close(status, wait=code != EXIT_PREEMPTED)
        barrier()
        return code

    def _record_memory(self) -> None:
        """Collective: every rank's peak memory and what building the model added, beside the plan's
        estimates, in ``memory.json`` (one entry per rank) and MLflow (the largest over the ranks)."""
        growth = self.build_memory
        ranks = all_gather_objects({"peak_gib": peak_bytes(self.env.device) / GIB,
                                    "build_host_gib": growth.host_bytes / GIB,
                                    "build_device_gib": None if growth.device_bytes is None else growth.device_bytes / GIB})
        if not self.env.is_main:
            return
        record = {"device": self.env.device.type, "zero_stage": self.cfg.parallel.zero_stage,
                  "built_partitioned": self.built_partitioned,
                  "model_state_estimate_gib": self.plan.memory.total / GIB,
                  "construction_estimate_gib": self.plan.construction_bytes / GIB, "ranks": ranks}
        write_atomic(self.run_dir / MEMORY_FILE, json.dumps(record, indent=1))
        peak = max(r["peak_gib"] for r in ranks)
        build = {"host": max(r["build_host_gib"] for r in ranks)}
        if self.env.device.type == "cuda":
            build["gpu"] = max(r["build_device_gib"] for r in ranks)
        print(f"memory: peak {peak:.2f} GiB on the fullest of {len(ranks)} rank(s) (model states estimated at "
              f"{record['model_state_estimate_gib']:.2f} GiB); building the model "
              f"({'partitioned' if self.built_partitioned else 'whole'}; fp32 weights estimated at "
              f"{record['construction_estimate_gib']:.2f} GiB) added at most "
              + ", ".join(f"{gib:.2f} GiB on the {where}" for where, gib in build.items()), flush=True)
        if self.tracker is not None:
            self.tracker.log_metrics({"memory/peak_gib_max_rank": peak,
                                      **{f"memory/build_{where}_gib_max_rank": gib for where, gib in build.items()}},
                                     self.step)

    def _mark_preempted(self) -> None:
        if not self.env.is_main:
            return
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        marker = self.run_dir / PREEMPTED_MARKER
        write_atomic(marker, json.dumps({"step": self.step, "time": time.time()}))
        print(f"stopped on request at step {self.step} after a checkpoint; exit {EXIT_PREEMPTED}", flush=True)

    def _write_metrics_line(self, loss: float, parts: dict, times: StepTimes) -> None:
        """Rank 0's per-step record (loss, timing, peak memory) next to the run; MLflow gets interval means."""
        if self.env.is_main:
            row = {"step": self.step, "loss": loss, **parts, "lr": self.lr_at(self.step - 1),
                   "step_time_s": times.total_s, "data_s": times.data_s,
                   "peak_memory_gib": peak_bytes(self.env.device) / GIB}
            with open(self.run_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def _log_window(self, window: Window, bar) -> None:
        if not self.env.is_main or window.steps == 0:
            return
        t = window.times
        images = window.steps * self.plan.samples_per_step
        images_per_s = images / t.total_s if t.total_s > 0 else 0.0
        metrics = {
            "loss": window.loss_sum / window.steps,
            **{f"loss/{k}": v / window.steps for k, v in window.parts.items()},
            "lr": self.lr_at(self.step - 1),
            "grad_norm": _grad_norm(self.engine),
            "images_per_s": images_per_s,
            "latents_per_s": images_per_s * self.data.seq_len,
            "step_time_s": t.total_s / window.steps,
            "data_wait_share": t.data_s / t.total_s if t.total_s > 0 else 0.0,
            "time/forward_backward_s": t.compute_s / window.steps,
            "time/optimizer_s": t.optimizer_s / window.steps,
            "memory/peak_gib": peak_bytes(self.env.device) / GIB,
            "nonfinite_skipped": float(self.nonfinite),
        }
        if self.peak:
            metrics["mfu"] = images_per_s / self.env.world_size * self.plan.flops_per_image / self.peak
        self.tracker.log_metrics(metrics, self.step)
        self.tracker.flush()
        remaining = (self.total_steps - self.step) * t.total_s / window.steps
        line = (f"step {self.step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                f"{images_per_s:.1f} img/s {metrics['latents_per_s']:.0f} latents/s data-wait "
                f"{100 * metrics['data_wait_share']:.0f}% mem {metrics['memory/peak_gib']:.2f} GiB "
                f"eta {remaining / 60:.1f} min")
        if "mfu" in metrics:
            line += f" mfu {100 * metrics['mfu']:.1f}%"
        (bar.write if not bar.disable else print)(line)
        sys.stdout.flush()

    # ---- checkpoints and samples ----------------------------------------------------------------
    def save(self) -> None:
        """Collective checkpoint of engine, EMA, data position, RNG and run id; then the latest pointer."""
        ref = ckpt.CheckpointRef(self.ckpt_dir, ckpt.tag_for(self.step), self.step, self.env.world_size)
        positions = all_gather_objects(self.loader.position.as_dict())
        rngs = all_gather_objects(ckpt.full_rng_state())
        run_id = self.tracker.run_id if self.tracker is not None else None
        run_id = all_gather_objects(run_id)[0]
        client = {"step": self.step, "config_yaml": self.config_yaml, "loader_positions": positions,
                  "rng_states": rngs, "mlflow_run_id": run_id, "world_size": self.env.world_size,
                  "nonfinite": self.nonfinite}
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        target_ema_state = self.target_ema.full_state_dict() if self.target_ema is not None else None
        try:
            ds.save_checkpoint(self.engine, str(self.ckpt_dir), ref.tag, client)
            if self.env.is_main:
                meta = {"step": self.step, "world_size": self.env.world_size, "mlflow_run_id": run_id,
                        "data": {"url": self.cfg.data.url, "seq_len": self.data.seq_len,
                                 "token_dim": self.data.token_dim, "num_classes": self.data.num_classes,
                                 "scale": self.loader.scale, "codec": dict(self.loader.manifest.codec)}}
                ckpt.write_sidecars(ref, self.config_yaml, meta, ema_state, target_ema_state)
        except (OSError, RuntimeError) as exc:
            # A full or failing disk: nothing points at this checkpoint; remove what was written of it.
            shutil.rmtree(ref.path, ignore_errors=True)
            previous = ckpt.read_latest(self.ckpt_dir)
            free_mib = shutil.disk_usage(self.ckpt_dir).free / MIB
            raise ckpt.CheckpointError(
                f"could not write checkpoint {ref.path} ({free_mib:.0f} MiB free there): {type(exc).__name__}: {exc}. "
                + (f"{ckpt.LATEST} still names {previous.tag}, which is complete; " if previous else "")
                + "free space there (or set checkpoint.url to a larger filesystem) and restart: the run resumes "
                "from the last complete checkpoint") from exc
        barrier()
        # Each node hashes the files its ranks wrote; rank 0 records them all before anything points here.
        digests = all_gather_objects(ckpt.file_digests(ref.path) if self.env.local_rank == 0 else {})
        if self.env.is_main:
            ckpt.write_file_list(ref, {name: d for node in digests for name, d in node.items()})
        barrier()
        location = str(ref.path.resolve())
        if self.remote is not None:
            # Each node uploads what its ranks wrote; the store's pointer moves only once every file is up.
            if self.env.local_rank == 0:
                self.remote.upload(ref.tag)
            barrier()
            location = f"{self.remote.url}/{ref.tag}"
        if self.env.is_main:
            ckpt.write_latest(ref)
            keep = self.cfg.checkpoint.keep_last
            if self.remote is not None:
                self.remote.write_latest(ref)
                self.remote.prune(keep, ref.tag)
            removed = ckpt.prune(self.ckpt_dir, keep, ref.tag)
            self.tracker.set_tags({"checkpoint/latest": location, "checkpoint/step": self.step})
            print(f"checkpoint {location} (removed {len(removed)} old)", flush=True)

    def evaluate(self) -> Optional[dict]:
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
        options = sampling_options(ev, self.dims.head_kind, self.data.seq_len)
        generator = ImageGenerator(model, self.codec, self.loader.scale, options, self.env.device, self.precision)
        job = SamplingJob(ev.num_images if self.scorer else ev.grid_images, self.data.num_classes, ev.batch_size,
                          self.cfg.run.seed)
        features, labels, grid, seconds = [], [], [], 0.0
        for _, batch, spent in iter_rank_batches(generator, job, self.env.rank, self.env.world_size):
            seconds += spent
            if self.scorer is not None:
                features.append(self.scorer.features(batch.images))
                labels.append(batch.labels)
            if self.env.is_main:
                grid.extend(batch.images[: max(0, ev.grid_images - len(grid))])
        del model, generator
        gathered = all_gather_objects((concat_features(features), labels, seconds))
        if not self.env.is_main:
            return None
        metrics = {"eval/images_per_s": job.num_images / max(s for _, _, s in gathered)}
        if self.scorer is not None:
            all_labels = np.concatenate([l for _, parts, _ in gathered for l in parts])
            scores = self.scorer.score(concat_features(f for f, _, _ in gathered if f), all_labels)
            metrics.update({f"eval/{k}": v for k, v in scores.items()})
            if scores.get("benchmark_valid") == 0.0:
                print(f"warning: {self.scorer.verdict.line()}: these scores cannot rank models", flush=True)
        self.tracker.log_metrics(metrics, self.step)
        self.tracker.flush()
        print(f"eval at step {self.step} ({job.num_images} images, K={options.num_iter}, head steps "
              f"{options.head_steps}, cfg {options.cfg_scale}): "
              + " ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items()), flush=True)
        if grid:
            image = tile(np.stack(grid), self.data.num_classes)
            save_image_atomic(image, self.run_dir / GRID_FILE.format(step=self.step))
            self.tracker.log_image(np.asarray(image), GRID_KEY, self.step)
        return metrics


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None
