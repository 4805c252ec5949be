"""Measurement scripts: each prints a table; results are recorded in docs/ with the command that made them.

Run them as modules from the repository root, e.g. ``python -m benchmarks.speed --help``; shared helpers are in
``benchmarks/_common.py`` (data, perplexity and training set-up come from lit_prune itself).
"""
