"""The quality benchmark: run.py, configs.py, report.py, paired.py (importable from benchmarks/)."""
