"""The gated model itself: gates on every attention and MLP branch (gates, config, adapters),
the per-token decision under a budget (plan, budget), how a decision is executed (execution,
tokens, layer), putting gates on a model and saving them (model), and the accounting of what
was skipped (stats, flops). Everything else in gateskip builds on these."""
