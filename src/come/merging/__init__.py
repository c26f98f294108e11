"""Building one layer from others: the merge operators and the least-squares refit."""
