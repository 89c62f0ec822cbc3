"""Benchmarks run by `vlkit bench`: controlled comparisons that train recipes and measure them."""
