"""Quality statistics, the FID Inception network's loading and shapes, reproducible sample files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from far_scale.eval.image_sets import IMAGES_KEY, LABELS_KEY, load_npz_images, save_npz
from far_scale.eval.inception import (
    NUM_LOGITS,
    POOL_DIM,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_PREFIX,
    FIDInceptionV3,
    InceptionWeightsError,
    load_inception,
    resize_like_tf1,
)
from far_scale.eval.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    precision_recall,
)


def _features(seed: int, n: int = 400, dim: int = 16, shift: float = 0.0) -> np.ndarray:
    # One correlated distribution (fixed mixing); ``seed`` draws a fresh sample of it.
    mixing = np.random.default_rng(1234).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + shift


def _scipy_frechet(a: FeatureStats, b: FeatureStats) -> float:
    """The textbook route (pytorch-fid's): a general matrix square root of S_a S_b."""
    from scipy import linalg

    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean.real))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    stats = FeatureStats.of(_features(0))
    assert abs(frechet_distance(stats, stats)) < 1e-8


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_frechet_distance_agrees_with_the_scipy_sqrtm_route(shift):
    a, b = FeatureStats.of(_features(1)), FeatureStats.of(_features(2, shift=shift))
    ours, reference = frechet_distance(a, b), _scipy_frechet(a, b)
    assert ours == pytest.approx(reference, rel=1e-4)


def test_a_shifted_set_scores_far_larger_than_a_fresh_draw():
    base = FeatureStats.of(_features(3))
    same = frechet_distance(base, FeatureStats.of(_features(4)))
    shifted = frechet_distance(base, FeatureStats.of(_features(4, shift=2.0)))
    assert shifted > 20 * same and shifted == pytest.approx(same + 16 * 4.0, rel=0.1)


def test_inception_score_bounds():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # every split holds each class equally often
    mean, std = inception_score(confident)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_precision_recall_separate_overlap_from_disjoint_sets():
    real = _features(5)
    precision, recall = precision_recall(real, _features(6))
    assert precision > 0.6 and recall > 0.6
    precision, recall = precision_recall(real, _features(6, shift=100.0))
    assert precision == 0.0 and recall == 0.0


def test_resize_matches_tensorflow_1x_bilinear():
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = resize_like_tf1(image, 4)
    # TF 1.x (align_corners=False): source = target * in/out = 0, .5, 1, 1.5; upper neighbour clamped.
    expected_row = torch.tensor([0.0, 5.0, 10.0, 10.0])
    torch.testing.assert_close(out[0, 0, 0], expected_row)
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))


# Shapes of the published network (TF 2015-12-05 graph as torch-fidelity names it), written out here
# independently of far_scale.eval.inception.
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file with the published layout and random values (the real file cannot be downloaded here)."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(state, path)
    return path, state


def test_inception_has_the_published_layout_and_output_sizes(inception_weights):
    from far_scale.codecs.base import sha256_file

    path, state = inception_weights
    for name, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    network = load_inception(path, expected_sha256=sha256_file(path))
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    out = network(images)
    assert out.pool.shape == (2, POOL_DIM) and out.logits.shape == (2, NUM_LOGITS)
    assert torch.isfinite(out.pool).all() and (out.pool >= 0).all()  # pooled after a ReLU
    # logits are the fc layer without its bias (torch-fidelity's IS input)
    torch.testing.assert_close(out.logits, out.pool @ network.fc.weight.T)


def test_inception_weights_missing_or_wrong_are_explained(inception_weights, tmp_path):
    with pytest.raises(InceptionWeightsError) as excinfo:
        load_inception(tmp_path / WEIGHTS_FILE)
    message = str(excinfo.value)
    assert str(tmp_path / WEIGHTS_FILE) in message and WEIGHTS_SHA256_PREFIX in message
    assert "torch-fidelity/releases" in message and "Nothing is downloaded" in message
    path, _ = inception_weights
    with pytest.raises(InceptionWeightsError, match="expected 6726825d"):
        load_inception(path)  # a random network is not the published file
    partial = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, partial)
    with pytest.raises(InceptionWeightsError, match="not the FID Inception-v3"):
        load_inception(partial, expected_sha256=None)


def test_sample_files_are_byte_reproducible(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(5)
    first = save_npz(tmp_path / "a.npz", {IMAGES_KEY: images, LABELS_KEY: labels}).read_bytes()
    second = save_npz(tmp_path / "b.npz", {IMAGES_KEY: images, LABELS_KEY: labels}).read_bytes()
    assert first == second
    loaded = load_npz_images(tmp_path / "a.npz")
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    save_npz(tmp_path / "bad.npz", {"x": images})
    with pytest.raises(ValueError, match="arr_0"):
        load_npz_images(tmp_path / "bad.npz")


def test_token_controls_keep_or_remove_what_they_say():
    from far_scale.eval.offline import shuffle_pixels, shuffle_tokens, token_means

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    blocks = lambda x: sorted(x[0].reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1).tolist())  # noqa: E731
    shuffled = shuffle_tokens(images, 4, seed=0)
    assert blocks(shuffled) == blocks(images) and not (shuffled == images).all()  # same patches, moved
    means = token_means(images, 4)
    assert (means[0, :4, :4] == np.round(images[0, :4, :4].astype(float).mean((0, 1)))).all()
    pixels = shuffle_pixels(images, seed=0)
    assert sorted(map(tuple, pixels[0].reshape(-1, 3))) == sorted(map(tuple, images[0].reshape(-1, 3)))
    with pytest.raises(ValueError, match="tokens of 5 px"):
        shuffle_tokens(images, 5, seed=0)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    from far_scale.eval.metrics import (
        FeatureStats,
        bootstrap_interval,
        frechet_distance,
    )

    rng = np.random.default_rng(1)
    reference = FeatureStats.of(rng.normal(size=(500, 8)))
    features = rng.normal(size=(400, 8))
    statistic = lambda rows: frechet_distance(FeatureStats.of(features[rows]), reference)  # noqa: E731
    low, high = bootstrap_interval(statistic, len(features))
    assert low <= statistic(np.arange(400)) <= high and low >= 0.0
    assert (low, high) == bootstrap_interval(statistic, len(features))


def test_verdict_needs_controls_clearly_worse_and_shape():
    from far_scale.eval.offline import (
        CALIBRATION_REAL,
        CONTROL_TOKEN_MEANS,
        CONTROL_TOKENS_SHUFFLED,
        QualityRow,
        judge,
    )

    def row(name, accuracy, fd, ae_fd=None):
        ae_fd = fd if ae_fd is None else ae_fd
        return QualityRow(
            name,
            100,
            accuracy,
            fd,
            0.5,
            0.5,
            fd,
            (accuracy - 0.02, accuracy + 0.02),
            (fd * 0.9, fd * 1.1),
            (fd * 0.9, fd * 1.1),
            ae_fd=ae_fd,
            ae_class_fd=ae_fd,
            ae_fd_ci=(ae_fd * 0.9, ae_fd * 1.1),
            ae_class_fd_ci=(ae_fd * 0.9, ae_fd * 1.1),
        )

    real = row(CALIBRATION_REAL, 0.99, 1.0)
    assert judge([real, row(CONTROL_TOKENS_SHUFFLED, 0.2, 100), row(CONTROL_TOKEN_MEANS, 0.4, 90)], 10).valid
    # clearly worse to the classifier but not in the autoencoder's space: the two spaces disagree, no ranking
    blind = judge([real, row(CONTROL_TOKENS_SHUFFLED, 0.2, 100), row(CONTROL_TOKEN_MEANS, 0.4, 90, ae_fd=1.02)], 10)
    assert not blind.valid and "autoencoder FD 1.02 vs 1.00" in blind.reason
    colour = judge([real, row(CONTROL_TOKENS_SHUFFLED, 0.87, 26), row(CONTROL_TOKEN_MEANS, 0.9, 12)], 10)
    assert not colour.valid and "without shape" in colour.reason
    overlap = judge([real, row(CONTROL_TOKENS_SHUFFLED, 0.2, 100), row(CONTROL_TOKEN_MEANS, 0.98, 1.05)], 10)
    assert not overlap.valid and "intervals overlap" in overlap.reason
    assert not judge([real], 10).valid  # no controls: nothing to judge by


def test_repeat_interval_is_the_t_interval_of_the_mean():
    from far_scale.eval.metrics import repeat_interval

    mean, low, high = repeat_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.303 * 1.0 / 3**0.5)  # t(0.975, 2) x sd / sqrt(n)
    assert mean - low == pytest.approx(high - mean)
    with pytest.raises(ValueError, match="2 to 11 repeats"):
        repeat_interval([1.0])


def test_offline_scores_without_resamples_skip_the_intervals():
    import numpy as np

    from far_scale.eval.offline import OfflineBenchmark

    bench = OfflineBenchmark.__new__(OfflineBenchmark)
    rng = np.random.default_rng(0)
    bench.reference = rng.normal(size=(40, 4))
    bench.reference_labels = np.arange(40) % 2
    from far_scale.eval.metrics import FeatureStats

    bench.reference_stats = FeatureStats.of(bench.reference)
    bench.reference_by_class = {c: FeatureStats.of(bench.reference[bench.reference_labels == c]) for c in (0, 1)}
    bench.ae_reference_stats, bench.ae_reference_by_class = bench.reference_stats, bench.reference_by_class
    bench.meta = {}
    bench.resamples = 0
    features = {
        "features": rng.normal(size=(20, 4)),
        "predicted": np.arange(20) % 2,
        "ae_features": rng.normal(size=(20, 4)),
    }
    scores = bench.score(features, np.arange(20) % 2)
    assert scores["accuracy"] == 1.0 and np.isnan(scores["accuracy_lo"]) and np.isfinite(scores["fd"])
    bench.resamples = 20
    scores = bench.score(features, np.arange(20) % 2)
    assert scores["fd_lo"] <= scores["fd"] <= scores["fd_hi"]
    assert scores["ae_fd_lo"] <= scores["ae_fd"] <= scores["ae_fd_hi"]


def test_share_interval_does_not_collapse_at_the_ceiling():
    from far_scale.eval.metrics import share_interval

    low, high = share_interval(1.0, 600)
    assert high == 1.0 and 0.99 < low < 0.995  # 600 of 600: [0.994, 1.0], not the point 1.0
    low, high = share_interval(0.5, 100)
    assert low == pytest.approx(1 - high) and 0.39 < low < 0.41
    assert share_interval(0.99, 6000)[0] > share_interval(0.99, 600)[0]  # more images, a tighter bound
