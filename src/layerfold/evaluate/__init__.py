"""Evaluation: our own fixed-length perplexity, and zero-shot tasks through lm-evaluation-harness."""
