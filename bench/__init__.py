"""Benchmarks of issue 3: `python -m bench` (see bench/__main__.py), results in bench/RESULTS.md."""
