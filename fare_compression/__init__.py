"""fare-moe compression: quantisation, sparsity, expert pruning and merging for MoE models."""
