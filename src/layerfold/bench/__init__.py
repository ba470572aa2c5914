"""Inference speed of dense and pruned models: latency, throughput, memory, ratio to ideal."""

from layerfold.bench.speed import SpeedConfig, load_for_bench, measure_models, results_table

__all__ = ["SpeedConfig", "load_for_bench", "measure_models", "results_table"]
