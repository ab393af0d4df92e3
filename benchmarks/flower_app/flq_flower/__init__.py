"""FLQ-Fed's federated round as a Flower App (benchmarks/compare_flower.py)."""
