"""Stages of ``benchmarks/gpu_check.py`` (``make gpu-check``); each runs in its own subprocess."""
