"""The main job, `gateskip demo` (what `make demo` runs): a pipeline of named stages
(pipeline) over a resumable report folder (job), ending in a verdict (report)."""

from .pipeline import register, run_job

__all__ = ["register", "run_job"]
