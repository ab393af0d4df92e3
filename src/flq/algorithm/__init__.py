"""The FLQ algorithm as pure functions on NumPy vectors: quantizers, bit
packing, the lazy rule, budget selection and aggregation (docs/algorithm.md).
No I/O and no deep-learning framework here."""
