"""Checkpoint pointers and retention, without training."""

from __future__ import annotations

import json

import pytest

from far_scale.train.checkpoint import (
    CheckpointError,
    CheckpointRef,
    prune,
    read_latest,
    tag_for,
    tags_to_prune,
)


def test_pruning_keeps_the_newest_up_to_the_current_and_drops_later_partial_ones():
    listing = iter([tag_for(s) for s in (2, 4, 6, 8)] + ["universal", "latest.json"])  # one-shot, like iterdir
    assert tags_to_prune(listing, 2, tag_for(6)) == [tag_for(2), tag_for(8)]


def test_prune_removes_old_and_newer_partial_checkpoints_from_disk(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / tag_for(step)).mkdir()
    assert prune(tmp_path, 1, tag_for(6)) == [tag_for(2), tag_for(4), tag_for(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(6)]


def test_a_damaged_pointer_names_itself_and_the_checkpoint_to_resume_from(tmp_path):
    (tmp_path / tag_for(4)).mkdir()
    (tmp_path / tag_for(4) / "meta.json").write_text(json.dumps({"world_size": 2}))
    (tmp_path / "latest.json").write_text('{"tag": "step_0')
    with pytest.raises(CheckpointError) as excinfo:
        read_latest(tmp_path)
    message = str(excinfo.value)
    assert f"{tmp_path / 'latest.json'} is damaged" in message
    assert json.dumps({"tag": tag_for(4), "step": 4, "world_size": 2}) in message
    (tmp_path / "latest.json").write_text(json.dumps({"tag": tag_for(4), "step": 4, "world_size": 2}))
    assert read_latest(tmp_path) == CheckpointRef(tmp_path, tag_for(4), 4, 2)
