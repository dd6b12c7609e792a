"""A plan applied to a network: consumers compensated or repaired, channels removed physically."""
