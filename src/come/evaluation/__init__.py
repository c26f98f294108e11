"""Evaluation: perplexity and zero-shot tasks, a comparison's report rows, the report and its plots."""
