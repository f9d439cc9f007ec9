"""Generation: the one Engine (continuous batching), its weights, sampling, the KV cache and the adapter bank."""
