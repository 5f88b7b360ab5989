"""PyTorch <-> Flax checkpoint converters. Installed as `mergejax.converters`."""
