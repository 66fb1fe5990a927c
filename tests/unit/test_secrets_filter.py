"""The secrets filter: names that end in a secret word are masked, shapes that merely contain one are not."""

from __future__ import annotations

import pytest

from far_scale.data.storage import redact_command
from far_scale.secrets import MASK, is_secret_name
from far_scale.tracking.mlflow_tracker import flatten, redact

SECRETS = [
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "aws_session_token",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "--aws-secret-access-key",
    "--token",
    "--key",
    "tracking.auth_token",
    "s3.api_token",
    "clientSecret",
    "db.password",
    "gcp.credentials",
    "private_key",
]
NOT_SECRETS = [
    "config.data.expect.token_dim",
    "config.model.num_buffer_tokens",
    "derived.latent_tokens_per_step",
    "config.run.record_sample_keys",
    "config.checkpoint.keep_last",
    "--order-seed",
    "--codec-weights",
    "keyboard",
    "tokenizer_path",
]


@pytest.mark.parametrize("name", SECRETS)
def test_secret_names_are_masked(name):
    assert is_secret_name(name)
    assert redact({name: "s3cr3t"}) == {name: MASK}


@pytest.mark.parametrize("name", NOT_SECRETS)
def test_names_that_only_contain_a_secret_word_are_kept(name):
    assert not is_secret_name(name)
    assert redact({name: 16}) == {name: 16}


def test_mlflow_params_of_a_config_keep_their_shapes():
    params = redact(flatten({"config": {"data": {"expect": {"token_dim": 16}}, "model": {"num_buffer_tokens": 4}}}))
    assert params == {"config.data.expect.token_dim": 16, "config.model.num_buffer_tokens": 4}


def test_command_lines_hide_secret_option_values_only():
    argv = ["far-scale", "x", "--aws-secret-access-key", "AKIA", "--token=abc", "--num-tokens", "16", "s3://u:p@h/b"]
    assert redact_command(argv) == [
        "far-scale",
        "x",
        "--aws-secret-access-key",
        MASK,
        f"--token={MASK}",
        "--num-tokens",
        "16",
        "s3://***@h/b",
    ]
