"""The runtime KV-cache manager: per-request caches over paged pools, tiers, batched steps."""
