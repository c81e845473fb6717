"""The runners of the absorb path: teacher generation, the fine-tune and
query synthesis. Each module registers one kind (see jobs.registry); the
settings' JOB_RUNNER_MODULES name them, and synthesis registers with the
package, so every process that runs jobs knows it."""

from jobs.runners import synthesis  # noqa: F401  (registers "synthesize")
