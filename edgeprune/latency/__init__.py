"""The latency table: a model's layers measured on a target, and the latency models built from it."""
