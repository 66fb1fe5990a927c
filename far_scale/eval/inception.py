"""The FID Inception-v3 in plain torch: TensorFlow's 2015-12-05 graph as torch-fidelity and pytorch-fid port it.

The standard FID/IS network differs from torchvision's Inception-v3 in a few places (average
pools that exclude padding, a max pool in the last block, 1008 classes, TF 1.x bilinear
resizing to 299 px); reproducing those is what makes the numbers comparable to published ones.
Weights come from a local file (``weights-inception-2015-12-05-6726825d.pth``, torch-fidelity's
release; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has the same tensors), checked
against its published sha256 prefix. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from far_scale.codecs.base import sha256_file

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
BN_EPS = 1e-3
# torch.hub convention: the file name carries the first hex digits of the file's sha256.
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_FILE = f"weights-inception-2015-12-05-{WEIGHTS_SHA256_PREFIX}.pth"
WEIGHTS_SOURCE = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE} (or pytorch-fid's "
    f"pt_inception-2015-12-05-{WEIGHTS_SHA256_PREFIX}.pth); download it on a machine with internet "
    "access and copy it here"
)


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are missing, corrupt or of another network; the message says what to do."""


def _conv(cin: int, cout: int, kernel, stride=1, padding=0) -> nn.Module:
    block = nn.Module()
    block.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    block.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
    return block


def _run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(block.bn(block.conv(x)))


def _chain(blocks, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = _run(block, x)
    return x


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool does not count the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35 x 35 blocks (Mixed_5b/c/d)
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _conv(cin, 48, 1), _conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _conv(64, 96, 3, padding=1), _conv(96, 96, 3, padding=1)
        self.branch_pool = _conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat(
            [
                _run(self.branch1x1, x),
                _chain([self.branch5x5_1, self.branch5x5_2], x),
                _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
                _run(self.branch_pool, _tf_avg_pool(x)),
            ],
            1,
        )


class _ReduceB(nn.Module):  # 35 -> 17 (Mixed_6a)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _conv(64, 96, 3, padding=1), _conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                _run(self.branch3x3, x),
                _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class _MixedC(nn.Module):  # 17 x 17 blocks with factorised 7x7 (Mixed_6b..e)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            _conv(cin, c7, 1),
            _conv(c7, c7, **row),
            _conv(c7, 192, **col),
        )
        self.branch7x7dbl_1 = _conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _conv(c7, c7, **col), _conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _conv(c7, c7, **col), _conv(c7, 192, **row)
        self.branch_pool = _conv(cin, 192, 1)

    def forward(self, x):
        return torch.cat(
            [
                _run(self.branch1x1, x),
                _chain([self.branch7x7_1, self.branch7x7_2, self.branch7x7_3], x),
                _chain(
                    [
                        self.branch7x7dbl_1,
                        self.branch7x7dbl_2,
                        self.branch7x7dbl_3,
                        self.branch7x7dbl_4,
                        self.branch7x7dbl_5,
                    ],
                    x,
                ),
                _run(self.branch_pool, _tf_avg_pool(x)),
            ],
            1,
        )


class _ReduceD(nn.Module):  # 17 -> 8 (Mixed_7a)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _conv(cin, 192, 1), _conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _conv(cin, 192, 1)
        self.branch7x7x3_2 = _conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                _chain([self.branch3x3_1, self.branch3x3_2], x),
                _chain([self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4], x),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class _MixedE(nn.Module):  # 8 x 8 blocks (Mixed_7b: average pool; Mixed_7c: max pool, as in the TF graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = _conv(cin, 320, 1)
        self.branch3x3_1 = _conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _conv(384, 384, **row), _conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _conv(cin, 448, 1), _conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _conv(384, 384, **row), _conv(384, 384, **col)
        self.branch_pool = _conv(cin, 192, 1)

    def forward(self, x):
        mid = _run(self.branch3x3_1, x)
        dbl = _chain([self.branch3x3dbl_1, self.branch3x3dbl_2], x)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat(
            [
                _run(self.branch1x1, x),
                _run(self.branch3x3_2a, mid),
                _run(self.branch3x3_2b, mid),
                _run(self.branch3x3dbl_3a, dbl),
                _run(self.branch3x3dbl_3b, dbl),
                _run(self.branch_pool, pooled),
            ],
            1,
        )


def resize_like_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear`` (align_corners=False): source = target * (in / out), no half-pixel
    offset, upper neighbour clamped to the edge. Float ``[N, C, H, W]``."""
    height, width = images.shape[-2:]

    def axis(in_size: int):
        position = torch.arange(size, dtype=torch.float32, device=images.device) * (in_size / size)
        low = position.long()
        return low, (low + 1).clamp(max=in_size - 1), (position - low.float()).to(images.dtype)

    y0, y1, dy = axis(height)
    x0, x1, dx = axis(width)
    top, bottom = images[..., y0, :], images[..., y1, :]
    rows = top + (bottom - top) * dy[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * dx


@dataclass(frozen=True)
class InceptionOutputs:
    pool: torch.Tensor
    """[N, 2048] pool3 features (FID)."""
    logits: torch.Tensor
    """[N, 1008] logits without the fc bias (torch-fidelity's ``logits_unbiased``, its IS default)."""


class FIDInceptionV3(nn.Module):
    """uint8 images ``[N, 3, H, W]`` -> ``InceptionOutputs``."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(POOL_DIM, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = resize_like_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = _chain([self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3], x)
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain([self.Conv2d_3b_1x1, self.Conv2d_4a_3x3], x)
        x = F.max_pool2d(x, 3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return InceptionOutputs(pool, pool @ self.fc.weight.T)


def load_inception(
    path: str | Path, expected_sha256: Optional[str] = WEIGHTS_SHA256_PREFIX, device: torch.device | str = "cpu"
) -> FIDInceptionV3:
    """The network with weights from the local file ``path``; its sha256 must start with ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(
            f"Inception weights not found: {path}. far-scale needs {WEIGHTS_FILE} "
            f"(sha256 {WEIGHTS_SHA256_PREFIX}...) from {WEIGHTS_SOURCE}. Nothing is "
            "downloaded at run time."
        )
    digest = sha256_file(path)
    if expected_sha256 and not digest.startswith(expected_sha256):
        raise InceptionWeightsError(
            f"Inception weights {path} have sha256 {digest}, expected {expected_sha256}...: "
            f"the file is corrupt or another network. Get {WEIGHTS_FILE} from {WEIGHTS_SOURCE}."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    result = model.load_state_dict(state, strict=False)
    # Converted TF weights may lack BatchNorm's step counter; every other tensor must match.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InceptionWeightsError(
            f"{path} is not the FID Inception-v3: missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}. Get {WEIGHTS_FILE} from {WEIGHTS_SOURCE}."
        )
    return model.to(device).eval().requires_grad_(False)
