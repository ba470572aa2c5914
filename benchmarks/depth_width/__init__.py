"""Depth only, width only and both at one parameter budget: run.py (CPU), run_gpu.py (GPU), report.py."""
