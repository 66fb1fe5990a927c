"""``far-scale sample``: images from an exported model (safetensors + config), decoded with the dataset's codec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from far_scale.config.loader import config_from_yaml
from far_scale.config.plan import DEFAULT_HEAD_STEPS
from far_scale.data.spec import DataSpec
from far_scale.eval.grid import decode_to_grid
from far_scale.models.model import ARModel, build_model
from far_scale.models.registry import resolve_dims
from far_scale.models.sampling import SamplingOptions, generate
from far_scale.train.export import EXPORT_CONFIG, EXPORT_EMA, EXPORT_META, EXPORT_RAW


@dataclass(frozen=True)
class SampleRequest:
    export_dir: str
    out: str
    num_images: int = 16
    labels: Optional[list[int]] = None
    num_iter: Optional[int] = None
    head_steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    temperature: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    raw_weights: bool = False


def load_exported(export_dir: str | Path, raw_weights: bool = False, device: str = "cpu") -> tuple[ARModel, dict, object]:
    """Model (EMA weights unless ``raw_weights``), the export's metadata and its config; safetensors only."""
    directory = Path(export_dir)
    cfg = config_from_yaml((directory / EXPORT_CONFIG).read_text(), str(directory / EXPORT_CONFIG))
    meta = json.loads((directory / EXPORT_META).read_text())
    data = meta["data"]
    model = build_model(cfg.model, DataSpec(data["seq_len"], data["token_dim"], data["num_classes"]))
    model.load_state_dict(load_file(str(directory / (EXPORT_RAW if raw_weights else EXPORT_EMA))))
    return model.to(device).eval(), meta, cfg


def sample_images(request: SampleRequest) -> Path:
    model, meta, cfg = load_exported(request.export_dir, request.raw_weights, request.device)
    ev = cfg.eval
    head_steps = request.head_steps or ev.head_steps or DEFAULT_HEAD_STEPS[resolve_dims(cfg.model).head_kind]
    options = SamplingOptions(
        num_iter=min(request.num_iter or ev.num_iter, model.seq_len), head_steps=head_steps,
        cfg_scale=ev.cfg_scale if request.cfg_scale is None else request.cfg_scale, cfg_schedule=ev.cfg_schedule,
        temperature=ev.temperature if request.temperature is None else request.temperature)
    num_classes = meta["data"]["num_classes"]
    labels = request.labels or [i % num_classes for i in range(request.num_images)]
    labels_t = torch.tensor(labels, device=request.device)
    generator = torch.Generator(device=request.device).manual_seed(request.seed)
    tokens = generate(model, labels_t, options, generator).float()
    out = Path(request.out)
    manifest = {"codec": meta["data"]["codec"]}
    if not decode_to_grid(tokens / meta["data"]["scale"], manifest, out, min(len(labels), num_classes)):
        raise FileNotFoundError("the dataset's codec weights are not available here: see the warning above")
    return out
