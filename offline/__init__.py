"""Offline side of vllm-haq: conversion, calibration, routing statistics, evaluation, CLI.

The Python API (docs/usage.md, Python API): ``convert_model`` converts a checkpoint, as ``haq convert`` does;
recipes (``offline.recipe``) are read with ``load_recipe`` / ``build_options`` and written with ``dump_recipe``.

Never imports vLLM (checked by tests/test_layering.py).
"""

from offline.api import convert_model
from offline.plan import ConvertError, ConvertOptions
from offline.recipe import RECIPE_FILE, RecipeError, build_options, dump_recipe, load_recipe, recipe_dict

__all__ = ["convert_model", "ConvertOptions", "ConvertError", "RecipeError", "RECIPE_FILE", "build_options",
           "load_recipe", "dump_recipe", "recipe_dict"]
