"""Which names hold secrets (a leaf module): one rule for command lines, MLflow params and logs.

A name is split into lower-case words at every non-alphanumeric character and camel-case boundary; it names a secret
when it *ends* in a secret word or phrase (``--aws-secret-access-key``, ``MLFLOW_TRACKING_TOKEN``, ``clientSecret``,
``db.password``). Words in the middle do not count: ``token_dim``, ``num_buffer_tokens`` and
``latent_tokens_per_step`` are shapes, not secrets.
"""

from __future__ import annotations

import re

SECRET_ENDINGS = (
    ("secret",),
    ("password",),
    ("passwd",),
    ("passphrase",),
    ("token",),
    ("credential",),
    ("credentials",),
    ("apikey",),
    ("key",),  # a bare --key, and every *_key: access_key, secret_key, private_key, api_key
    ("key", "id"),  # AWS_ACCESS_KEY_ID names the credential pair
)
MASK = "***"


def name_words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def is_secret_name(name: str) -> bool:
    """Whether ``name`` (an option, environment variable or dotted config key) names a secret."""
    words = name_words(name)
    return any(tuple(words[-len(ending) :]) == ending for ending in SECRET_ENDINGS if len(words) >= len(ending))
