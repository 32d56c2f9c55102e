"""The Python API of the converter: ``convert_model``, llm-compressor's ``oneshot`` for HAQ checkpoints.

llm-compressor users write ``oneshot(model=..., dataset=..., recipe=..., output_dir=...)``; here it is
``convert_model(model, output_dir, recipe=..., dataset=..., **options)``, the same call ``haq convert`` makes:
the recipe (``offline.recipe``: a YAML/JSON file, a dict laid out as one, or ``ConvertOptions``) is the base,
``dataset`` and the keyword options are put on top of it, as the command line's flags are on ``--recipe``.
The keywords are ``ConvertOptions``' field names (``samples``, ``seq_len``, ``method``, ...: the flags without
their dashes); llm-compressor's names are refused with the name to use rather than silently mapped, so that one
spelling of each option exists (docs/usage.md has the table).

It is named ``convert_model``, not ``convert``: ``offline.convert`` is the module that carries conversions out,
and a package attribute of that name would hide it from ``import offline.convert`` users and patch targets.
"""

from __future__ import annotations

import os

from offline.convert import ConvertEvents, convert
from offline.recipe import RecipeError, build_options

# llm-compressor's oneshot() arguments -> ours (named in the error, not accepted: see the module doc)
LLM_COMPRESSOR_NAMES = {"num_calibration_samples": "samples", "max_seq_length": "seq_len", "splits": "calib_split",
                        "text_column": "calib_field", "batch_size": "chunk"}


def convert_model(model: str | os.PathLike, output_dir: str | os.PathLike, recipe=None, dataset=None, *,
                  overwrite: bool = False, resume: bool = False, progress=None,
                  events: ConvertEvents | None = None, **options) -> str:
    """Convert the Hugging Face checkpoint directory ``model`` into ``output_dir``; returns its absolute path.

    ``recipe``: None (the defaults), a recipe file (YAML, or JSON by its ``.json`` name), a dict laid out as a
    recipe, or ``ConvertOptions``. ``dataset``: the calibration sources (one or a list; ``haq convert --calib``'s
    forms: text files, ``hf:ID[:CONFIG]``, the presets), replacing the recipe's ``calibration.dataset``.
    ``options``: any ``ConvertOptions`` field (``samples=8``, ``method="rtn"``, ``format="compressed-tensors"``),
    replacing the recipe's value. ``overwrite`` / ``resume``: as ``haq convert --overwrite`` / ``--resume``.
    ``progress(report, num_layers)`` after each layer, ``events`` for the other steps (``offline.convert``).

    ``output_dir`` gets the recipe actually used (``haq_recipe.yaml``: every option, defaults included);
    ``convert_model(model, other_dir, recipe=output_dir + "/haq_recipe.yaml")`` makes the same files. Raises
    ``RecipeError`` for a bad recipe or option (naming the file and key), else the errors of ``haq convert``
    (``ConvertError``, ``CalibrationError``, ``SourceError``: all ``vllm_haq.errors.HAQError``).
    """
    for name in options:
        if name in LLM_COMPRESSOR_NAMES:
            raise RecipeError(f"convert_model(): {name!r} is llm-compressor's name; pass "
                              f"{LLM_COMPRESSOR_NAMES[name]}= (docs/usage.md, Python API)")
    if dataset is not None:
        options["calib"] = _sources(dataset)
    # only when set: an error about the recipe then names the keywords only if some were given
    options.update({k: True for k, v in (("overwrite", overwrite), ("resume", resume)) if v})
    opts = build_options(recipe, options)
    convert(os.fspath(model), os.fspath(output_dir), opts, progress=progress, events=events)
    return os.path.abspath(os.fspath(output_dir).rstrip("/"))


def _sources(dataset) -> list[str]:
    """``dataset`` as calibration sources; a loaded ``datasets.Dataset`` (llm-compressor takes one) is refused with
    the way to pass it: a file, which the recipe can then name."""
    if isinstance(dataset, (str, os.PathLike)):
        return [os.fspath(dataset)]
    if isinstance(dataset, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in dataset):
        return [os.fspath(d) for d in dataset]
    raise RecipeError(f"convert_model(): dataset: expected a calibration source or a list of them (a text/.jsonl/"
                      f".parquet file, hf:ID[:CONFIG], wikitext2|c4|pile), got {type(dataset).__name__}; save a "
                      f"loaded dataset first (ds.to_json('calib.jsonl')) and pass that file")
