"""Offline side of vllm-haq: conversion, calibration, routing statistics, evaluation, CLI.

Never imports vLLM (checked by tests/test_layering.py).
"""
