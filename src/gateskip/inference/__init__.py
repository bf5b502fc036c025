"""Running a gated model: budgets from calibrated thresholds and stored allocations
(calibrate), HF generate with skipping (generation), the lean cached decoder (decoding,
compiled) and lossless self-speculative decoding on top of it (speculative), the checks
and results they share (contract), and speed measurement (bench, timing)."""
