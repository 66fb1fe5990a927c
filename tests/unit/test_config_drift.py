"""A resume under another recipe: refused naming the keys, except where only the run's or the data's location moved."""

from __future__ import annotations

import json

import pytest

from far_scale.artifacts import CONFIG_FILE, META_FILE, DataInfo, RunMeta
from far_scale.config.loader import config_to_yaml, load_config
from far_scale.train.config_drift import ConfigDriftError, check_resume
from tests.conftest import REPO_ROOT

RECIPE = REPO_ROOT / "recipes" / "far_tiny_digits32.yaml"
DIGEST = "a" * 64


def _checkpoint(tmp_path, digest, *overrides):
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    cfg = load_config(RECIPE, ["data.url=/data/old", "run.name=before", *overrides])
    (folder / CONFIG_FILE).write_text(config_to_yaml(cfg))
    info = DataInfo("/data/old", 16, 16, 10, 1.0, {"name": "pca"}, None, digest)
    (folder / META_FILE).write_text(json.dumps(RunMeta(2, 1, None, info).as_dict()))
    return folder


def test_the_same_shards_at_another_url_and_a_renamed_run_are_no_change(tmp_path):
    folder = _checkpoint(tmp_path, DIGEST)
    moved = load_config(RECIPE, ["data.url=s3://bucket/staged", "run.name=after"])
    assert check_resume(folder, moved, DIGEST, allow=False) == {}


@pytest.mark.parametrize("saved, reason", [("b" * 64, "holds other shards"), (None, "does not record which shards")])
def test_other_or_unknown_shards_at_another_url_are_refused_naming_why(tmp_path, saved, reason):
    folder = _checkpoint(tmp_path, saved)
    moved = load_config(RECIPE, ["data.url=/data/new"])
    with pytest.raises(ConfigDriftError) as error:
        check_resume(folder, moved, DIGEST, allow=False)
    assert "data.url: '/data/old' -> '/data/new'" in str(error.value) and reason in str(error.value)
    assert check_resume(folder, moved, DIGEST, allow=True) == {"data.url": ("/data/old", "/data/new")}


def test_a_learning_change_is_refused_even_with_the_same_data(tmp_path):
    folder = _checkpoint(tmp_path, DIGEST)
    changed = load_config(RECIPE, ["data.url=/data/old", "optim.lr=3e-4"])
    with pytest.raises(ConfigDriftError, match="optim.lr") as error:
        check_resume(folder, changed, DIGEST, allow=False)
    assert "data.url" not in str(error.value)


def test_a_meta_written_before_the_digest_still_reads(tmp_path):
    folder = _checkpoint(tmp_path, DIGEST)
    data = json.loads((folder / META_FILE).read_text())
    del data["data"]["content_digest"]
    assert RunMeta.from_dict(data, "meta.json").data.content_digest is None
