"""Evaluation: accuracy with intervals and pass@k (evaluate), paired comparisons of two evaluations (paired)."""
