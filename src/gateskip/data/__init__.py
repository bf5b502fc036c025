"""Text the project trains, calibrates and searches on: the training and held-out corpora built
from bundled sources (corpus), reading and tokenizing any text source (textdata), and the
small samples calibration, ShortGPT and the benchmarks run on (samples)."""
