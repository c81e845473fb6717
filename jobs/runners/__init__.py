"""The runners of the absorb path: teacher generation and the fine-tune.
Each module registers one kind (see jobs.registry)."""
