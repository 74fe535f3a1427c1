"""Benchmarks: stratlm against mlx-lm on the same model, prompt and token count (`stratlm bench`)."""

from .runner import BenchConfig, BenchReport, format_report, run_bench

__all__ = ["BenchConfig", "BenchReport", "format_report", "run_bench"]
