"""Evaluating pruned variants before writing them: layer-streamed KL, agreement and perplexity."""
