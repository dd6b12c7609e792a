"""Widths under a latency budget: the inner level (allocations) and the outer searches."""
