"""Where to skip: the per-module allocation search for a net-saving target (allocation), the
baselines it is compared with (ShortGPT layer removal, random, CALM exits: baselines,
saturation), and the fast held-out proxy that compares them (proxy)."""
