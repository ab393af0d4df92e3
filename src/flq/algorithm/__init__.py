"""The FLQ algorithm as pure functions on NumPy vectors: quantizers, bit
packing, the lazy rule, budget selection and aggregation (SPEC.md).
No I/O and no deep-learning framework here."""
