"""Planning past one machine: what a run with a given plan moves per optimizer step over the network, reads from
storage per node, and writes per checkpoint, at stated throughput and bandwidths.

Traffic per GPU follows the ring-collective accounting of the ZeRO paper (Rajbhandari et al., 2020): with N ranks
an all-reduce of P bytes sends 2(N-1)/N·P per rank, a reduce-scatter or all-gather (N-1)/N·P. What DeepSpeed
0.19 runs per optimizer step with A micro-batches of accumulation:
- ZeRO-0: one all-reduce of the gradients at the accumulation boundary;
- ZeRO-1: one reduce-scatter of the gradients at the boundary, one all-gather of the updated parameters;
- ZeRO-2: a reduce-scatter of the gradients in every micro-step's backward, one all-gather of the parameters;
- ZeRO-3: per micro-step, an all-gather of the parameters in forward and again in backward, and a
  reduce-scatter of the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from far_scale.data.contract import LATENT_DTYPE
from far_scale.distributed.deepspeed_config import ADAM_STATES, BYTES_PER_PARAM, FP32_BYTES

GBIT = 1e9 / 8  # bytes per second in one Gbit/s
GIB = 1024**3
VIEWS_PER_SAMPLE = 2  # each stored sample holds the image's latents and its flipped view's (data/contract.py)


@dataclass(frozen=True)
class ScaleAssumptions:
    """What check-config cannot know about the cluster: stated, printed, and overridable on its command line."""

    images_per_s_per_gpu: float = 300.0
    """Training throughput per GPU (far-scale's FAR-L goal on one H100; MAR-L's official is ~254)."""
    gpus_per_node: int = 8
    network_gbps_per_gpu: float = 400.0
    """Inter-node bandwidth per GPU (one NDR InfiniBand port per H100 in common 8-GPU nodes)."""
    storage_gbps_per_node: float = 10.0
    """Object-storage bandwidth per node, for reading shards and uploading checkpoints."""


@dataclass(frozen=True)
class ScalePlan:
    comm_bytes_per_step_per_gpu: float
    comm_s_per_step: float
    """At ``network_gbps_per_gpu``, if nothing overlaps with compute."""
    compute_s_per_step: float
    """One optimizer step's images per GPU at ``images_per_s_per_gpu``."""
    bytes_per_sample: float
    data_bytes_per_s_per_node: float
    checkpoint_bytes: float
    checkpoint_upload_s: float
    """Each node uploads its own ranks' files in parallel at ``storage_gbps_per_node``."""

    @property
    def comm_share(self) -> float:
        return self.comm_s_per_step / self.compute_s_per_step if self.compute_s_per_step else 0.0


def comm_bytes_per_step(
    num_params: int, zero_stage: int, world_size: int, grad_accum_steps: int, param_bytes: int, reduce_bytes: int
) -> float:
    """Bytes one GPU sends per optimizer step (module docstring)."""
    ring = (world_size - 1) / world_size
    grads, params = num_params * reduce_bytes, num_params * param_bytes
    if zero_stage == 0:
        return 2 * ring * grads
    if zero_stage == 1:
        return ring * (grads + params)
    if zero_stage == 2:
        return ring * (grad_accum_steps * grads + params)
    return grad_accum_steps * ring * (2 * params + grads)


def checkpoint_bytes(num_params: int, precision: str, whole_ema_params: int) -> float:
    """All ranks' files of one checkpoint: weights, fp32 master copy (bf16), AdamW moments, the evaluation
    EMA and any whole target network (fp32), written once over the ranks."""
    master = FP32_BYTES if precision != "fp32" else 0
    per_param = BYTES_PER_PARAM[precision] + master + ADAM_STATES * FP32_BYTES + FP32_BYTES
    return num_params * per_param + FP32_BYTES * whole_ema_params


def plan_scale(
    num_params: int,
    whole_ema_params: int,
    zero_stage: int,
    world_size: int,
    grad_accum_steps: int,
    micro_batch: int,
    precision: str,
    reduce_dtype: str,
    seq_len: int,
    token_dim: int,
    assumptions: ScaleAssumptions,
    stored_bytes_per_sample: Optional[float] = None,
) -> ScalePlan:
    """``stored_bytes_per_sample`` from the manifest (shard bytes / samples) when there is one; else the
    latents' size (both views, fp16) without the tar and label overhead."""
    comm = comm_bytes_per_step(
        num_params, zero_stage, world_size, grad_accum_steps, BYTES_PER_PARAM[precision], BYTES_PER_PARAM[reduce_dtype]
    )
    compute_s = grad_accum_steps * micro_batch / assumptions.images_per_s_per_gpu
    per_sample = stored_bytes_per_sample or VIEWS_PER_SAMPLE * seq_len * token_dim * LATENT_DTYPE().itemsize
    size = checkpoint_bytes(num_params, precision, whole_ema_params)
    nodes = max(1, -(-world_size // assumptions.gpus_per_node))
    return ScalePlan(
        comm_bytes_per_step_per_gpu=comm,
        comm_s_per_step=comm / (assumptions.network_gbps_per_gpu * GBIT),
        compute_s_per_step=compute_s,
        bytes_per_sample=per_sample,
        data_bytes_per_s_per_node=per_sample
        * assumptions.images_per_s_per_gpu
        * min(world_size, assumptions.gpus_per_node),
        checkpoint_bytes=size,
        checkpoint_upload_s=size / nodes / (assumptions.storage_gbps_per_node * GBIT),
    )


def render_scale(plan: ScalePlan, assumptions: ScaleAssumptions, world_size: int, zero_stage: int) -> list[str]:
    a = assumptions
    mib = 2**20
    return [
        f"# at scale (assumed: {a.images_per_s_per_gpu:g} images/s per GPU, {a.gpus_per_node} GPUs per node, "
        f"{a.network_gbps_per_gpu:g} Gbit/s network per GPU, {a.storage_gbps_per_node:g} Gbit/s storage per node; "
        "change with --images-per-s --gpus-per-node --network-gbps --storage-gbps)",
        f"communication: {plan.comm_bytes_per_step_per_gpu / mib:,.1f} MiB sent per GPU per optimizer step "
        f"(ZeRO-{zero_stage}, {world_size} ranks) = {plan.comm_s_per_step:.3f} s against "
        f"{plan.compute_s_per_step:.3f} s of compute per step ({100 * plan.comm_share:.0f}% if not overlapped)",
        f"data: {plan.bytes_per_sample / 1024:,.1f} KiB per sample -> {plan.data_bytes_per_s_per_node / mib:,.1f} MiB/s "
        f"read per node ({100 * plan.data_bytes_per_s_per_node / (a.storage_gbps_per_node * GBIT):.0f}% of its "
        "storage bandwidth)",
        f"checkpoint: {plan.checkpoint_bytes / GIB:,.2f} GiB over all ranks; upload "
        f"{plan.checkpoint_upload_s:,.1f} s (each node its own ranks' share)",
    ]
