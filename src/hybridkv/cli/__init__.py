"""The console script: hybridkv models, plan, simulate and bench step."""
