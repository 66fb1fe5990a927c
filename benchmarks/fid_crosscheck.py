"""Cross-check far-scale's FID / IS against torch-fidelity on the same images (a machine where it installs).

torch-fidelity needs torchvision, which does not load beside the CPU torch of the core install, so this
runs where `pip install '.[eval]'` works (a CUDA machine). Both libraries read the same local weights file.

    python -m benchmarks.fid_crosscheck SAMPLES.npz REFERENCE.npz --inception weights-inception-2015-12-05-6726825d.pth

SAMPLES and REFERENCE are image sets (``arr_0`` uint8 NHWC). Prints both results and their differences and
writes them to benchmarks/results/fid_crosscheck__<device>.json.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.report import command_line, describe_machine, save_result
from far_scale.eval.fid import InceptionScorer
from far_scale.eval.image_sets import load_npz_images
from far_scale.eval.inception import load_inception
from far_scale.eval.metrics import FeatureStats


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


def far_scale_metrics(samples: np.ndarray, reference: np.ndarray, weights: str, device: str, batch: int) -> dict:
    network = load_inception(weights, device=device)
    probe = InceptionScorer(network, FeatureStats(np.zeros(1), np.eye(1), 0), None, device, batch)
    reference_stats = FeatureStats.of(probe.features(reference)["pool"])
    scorer = InceptionScorer(network, reference_stats, None, device, batch)
    return scorer.score(scorer.features(samples), np.full(len(samples), -1))


def torch_fidelity_metrics(samples: np.ndarray, reference: np.ndarray, weights: str, device: str, batch: int) -> dict:
    import torch_fidelity

    out = torch_fidelity.calculate_metrics(
        input1=_Images(samples),
        input2=_Images(reference),
        fid=True,
        isc=True,
        cuda=device.startswith("cuda"),
        batch_size=batch,
        feature_extractor_weights_path=weights,
        verbose=False,
    )
    return {
        "fid": out["frechet_inception_distance"],
        "is": out["inception_score_mean"],
        "is_std": out["inception_score_std"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples")
    parser.add_argument("reference")
    parser.add_argument("--inception", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    samples, reference = load_npz_images(args.samples).images, load_npz_images(args.reference).images
    ours = far_scale_metrics(samples, reference, args.inception, args.device, args.batch)
    theirs = torch_fidelity_metrics(samples, reference, args.inception, args.device, args.batch)
    diff = {k: ours[k] - theirs[k] for k in theirs}
    for key in theirs:
        print(f"{key}: far-scale {ours[key]:.4f}  torch-fidelity {theirs[key]:.4f}  difference {diff[key]:+.4f}")
    device = torch.device(args.device)
    save_result(
        "fid_crosscheck",
        device.type,
        {
            "machine": describe_machine(device),
            "num_samples": len(samples),
            "num_reference": len(reference),
            "far_scale": ours,
            "torch_fidelity": theirs,
            "difference": diff,
            "command": command_line("fid_crosscheck.py", argv),
        },
    )


if __name__ == "__main__":
    main()
