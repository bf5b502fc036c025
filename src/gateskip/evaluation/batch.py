"""lm-eval's batch size under gateskip. GatedLM masks the padding of a batch, so a batch of 8
scores exactly as batch size 1 does, only faster (docs/evaluation.md, "Batch size")."""

DEFAULT_BATCH_SIZE = 8
