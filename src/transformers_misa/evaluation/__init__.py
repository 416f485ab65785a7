"""Evaluation harnesses: recall, perplexity, Needle-in-a-Haystack, LongBench."""
