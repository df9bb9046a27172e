"""The benchmark: does synthgen's data make a detector better on real held-out images?

`run_benchmark(config, scale)` runs splits -> chips -> generator -> generate -> compose
-> detectors -> evaluation, each stage cached by a hash of its inputs, then writes the report.
"""

from synthgen.benchmark.config import ARMS, BenchmarkConfig, ScaleConfig
from synthgen.benchmark.pipeline import run_benchmark
from synthgen.benchmark.report import write_report

__all__ = ["ARMS", "BenchmarkConfig", "ScaleConfig", "run_benchmark", "write_report"]
