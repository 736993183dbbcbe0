"""Continuous batching over the KV-cache manager, with a liveness guarantee."""
