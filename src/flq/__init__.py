"""FLQ-Fed: federated learning with low-bit, lazy, budgeted communication.

See docs/algorithm.md for the algorithm and README.md for the commands.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment already sets it: PyTorch's OpenMP threads then sleep between
parallel regions instead of spinning. On a machine shared with other
busy processes, spinning threads fight the others for the cores: two
simulations at once on 2 cores took 6.6 s a round each spinning, 3.7 s
sleeping; alone, 2.56 and 2.51 s (``benchmarks/shared_machine.py``). It must be set before PyTorch is
first imported, so it takes effect when ``flq`` is imported first (every
``flq`` command and script is); ``OMP_WAIT_POLICY=ACTIVE`` restores
OpenMP's default.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
