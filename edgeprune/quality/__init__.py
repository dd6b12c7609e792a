"""How faithful a pruned model is: fidelity on held-out data, the masked proxy's replay, the release's gates."""
