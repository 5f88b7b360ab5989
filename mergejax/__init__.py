"""mergejax: merging neural networks without retraining, in JAX/Flax."""
