"""The coupled channel groups of a network (torch-pruning's dependency graph), grouped convolutions and the reshapes it
cannot map."""
