"""Part "norm": normalization layers and their normalization-free alternatives."""
