"""``python -m benchmarks.orderings``: the only place this benchmark sets environment variables."""

import os

# Before TensorFlow starts: quiet logs. OMP_WAIT_POLICY is left as the user has it (unset, by default,
# as users run); each record notes the policy in effect, and the cost model uses the matching thread term.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .cli import main

main()
