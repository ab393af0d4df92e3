"""FLQ-Fed: federated learning with low-bit, lazy, budgeted communication.

See docs/algorithm.md for the algorithm and README.md for the commands."""

__version__ = "0.1.0"
