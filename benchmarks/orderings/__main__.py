"""``python -m benchmarks.orderings``: the only place this benchmark sets environment variables."""

import os

# Before torch and TensorFlow start. OMP_WAIT_POLICY: see ../shared/BENCHMARKING.md; a value the user
# set wins, and the run records the one in effect.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .cli import main

main()
