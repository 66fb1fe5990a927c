"""Offline data preparation jobs: synthesize images, fit/encode latents, write and check shards."""
