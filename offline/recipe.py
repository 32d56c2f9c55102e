"""Conversion recipes: every option of a conversion in one YAML (or JSON) document.

A recipe is what llm-compressor users hand ``oneshot(recipe=...)``: the conversion written down, to keep with
the checkpoint, review, edit and run again. ``haq convert --recipe FILE`` and ``offline.convert_model(...,
recipe=FILE)`` read one; every conversion writes the recipe it carried out into its output directory
(``RECIPE_FILE``), and converting the same model with that file gives the same checkpoint, byte for byte.
Version 1 (``dump_recipe`` writes each key with the ``haq convert`` flag it stands for)::

    haq_recipe: 1
    method: haq                  # rtn | gptq | smoothquant | haq
    ignore: [lm_head, ...]
    rotation: null               # search | all | none; null: search for haq into a HAQ checkpoint, else none
    format: haq                  # haq | compressed-tensors
    calibration: {dataset: [wiki.train.txt], split: null, field: null, chat_template: false, samples: 64,
                  seq_len: 512, seed: 0, routing_stats: true, batch_size: 8}
    smoothing: {alpha: 0.5, moe: shared}
    gptq: {block_size: 128, dampening: 0.01, act_order: true}

Keys, types, choices and bounds are ``ConvertOptions``' (each field's metadata, ``offline.plan._option``), not a
second list that could drift from the options. A missing key takes its default, so a recipe may hold only what
it changes; unknown keys, wrong types and values outside the choices or bounds raise ``RecipeError`` naming the
file and the key. ``resume``, ``overwrite``, ``cache_dir`` and ``device`` are no recipe keys: they say how a run
proceeds, not what it makes. Paths (``calibration.dataset``) are kept as written and, as on the command line,
relative ones resolve against the current directory, not the recipe's: the recipe a conversion writes records them
as they were given.

The file is named ``haq_recipe.yaml``, not llm-compressor's ``recipe.yaml``: a ``--format compressed-tensors``
checkpoint carries it, and there ``recipe.yaml`` would be read as an llm-compressor modifier recipe (``haq
import`` skips that file for the same reason), like ``haq_routing.safetensors`` beside the weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing

from vllm_haq import __version__

from offline.plan import ConvertError, ConvertOptions, check_options, option_problem

RECIPE_FILE = "haq_recipe.yaml"
VERSION_KEY = "haq_recipe"
RECIPE_VERSION = 1


class RecipeError(ConvertError, ValueError):
    """A recipe (or an option given beside one) that cannot be used; the message names the file and the key."""


def recipe_fields() -> dict[str, dataclasses.Field]:
    """Recipe key (``calibration.samples``) -> its ``ConvertOptions`` field: top-level keys first, then the
    sections in the order of their first field."""
    keyed = [(f.metadata["recipe"], f) for f in dataclasses.fields(ConvertOptions) if f.metadata.get("recipe")]
    return dict(sorted(keyed, key=lambda kf: "." in kf[0]))  # stable: field order within each group


def _hint(f: dataclasses.Field):
    return typing.get_type_hints(ConvertOptions)[f.name]


def _typed(hint, value):
    """``value`` as an option of type ``hint``, or raise TypeError saying what was expected."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # X | None
        return None if value is None else _typed(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(hint) is list:  # list[str]; a single string is a list of one (llm-compressor's dataset=)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TypeError("a list of strings")
    if hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-2 as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise TypeError({bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint])


def check_value(f: dataclasses.Field, value, label: str):
    """``value`` for option ``f`` converted to its type (1 -> 1.0, "x" -> ["x"]), or ``RecipeError`` "label: ..."
    when its type is wrong or it is outside the choices or bounds."""
    try:
        value = _typed(_hint(f), value)
    except TypeError as exc:
        raise RecipeError(f"{label}: expected {exc}, got {value!r}") from None
    problem = option_problem(f, value)
    if problem:
        raise RecipeError(f"{label}: {value!r} {problem}")
    return value


def _unknown(where: str, key: str, known: list[str], what: str = "key") -> RecipeError:
    """The error for a key no option has: a close key suggested, the options that are no recipe keys explained."""
    run_only = {f.name: f.metadata.get("flag") for f in dataclasses.fields(ConvertOptions)
                if not f.metadata.get("recipe")}
    if key in run_only:
        return RecipeError(f"{where}: {key!r} is no recipe key: it says how a run proceeds, not what it makes; pass "
                           f"{run_only[key]} (convert_model({key}=...)) instead")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"{where}: unknown {what} {key!r}{hint}; known: {', '.join(known)}")


def _flatten(doc, where: str) -> dict[str, object]:
    """A recipe document -> {dotted key: value}; its sections must be mappings (an empty one, null, is none)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys ({VERSION_KEY}, method, calibration, ...), "
                          f"not {type(doc).__name__}")
    sections = {k.partition(".")[0] for k in recipe_fields() if "." in k}
    flat = {}
    for key, value in doc.items():
        key = str(key)
        if key in sections:
            if value is not None and not isinstance(value, dict):
                raise RecipeError(f"{where}: {key}: expected a mapping of its keys, got {value!r}")
            flat.update({f"{key}.{k}": v for k, v in (value or {}).items()})
        else:
            flat[key] = value
    return flat


def parse_recipe(doc, where: str) -> dict[str, object]:
    """The options a recipe document sets (field name -> checked value); ``where`` names it in errors."""
    flat = _flatten(doc, where)
    version = flat.pop(VERSION_KEY, RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"{where}: {VERSION_KEY}: {version!r} is not a recipe version this vllm-haq "
                          f"({__version__}) reads; it reads {RECIPE_VERSION}")
    fields = recipe_fields()
    out = {}
    for key, value in flat.items():
        if key not in fields:
            raise _unknown(where, key, [VERSION_KEY, *fields])
        out[fields[key].name] = check_value(fields[key], value, f"{where}: {key}")
    return out


def load_recipe(path: str | os.PathLike) -> dict[str, object]:
    """The options a recipe file sets; YAML, or JSON for a ``.json`` file (YAML would read most JSON too, but
    JSON's own parser says where it breaks in JSON's terms)."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(f"{path}: not valid YAML ({at}{getattr(exc, 'problem', None) or exc})") from None
    return parse_recipe(doc, path)


def build_options(recipe=None, overrides: dict | None = None, origin: str = "convert_model()",
                  flags: bool = False) -> ConvertOptions:
    """The options of a conversion: ``recipe`` — None (the defaults), a path to a YAML/JSON recipe, a dict laid
    out as one, or ``ConvertOptions`` — with ``overrides`` (field name -> value: the flags given on the command
    line, ``convert_model``'s keywords) on top, then checked as a whole (``check_options``). ``origin`` names the
    overrides in errors; with ``flags`` (the command line) each is named by its flag."""
    names = {f.name: f for f in dataclasses.fields(ConvertOptions)}
    if recipe is None:
        base, source = {}, None
    elif isinstance(recipe, ConvertOptions):
        base, source = {n: getattr(recipe, n) for n in names}, None
    elif isinstance(recipe, dict):
        base, source = parse_recipe(recipe, "recipe (dict)"), "recipe (dict)"
    elif isinstance(recipe, (str, os.PathLike)):
        base, source = load_recipe(recipe), os.fspath(recipe)
    else:
        raise RecipeError(f"recipe: expected a path, a dict or ConvertOptions, got {type(recipe).__name__}")
    for name, value in (overrides or {}).items():
        if name not in names:
            raise _unknown(origin, name, list(names), "option")
        label = names[name].metadata.get("flag") if flags else f"{origin} {name}"
        base[name] = check_value(names[name], value, label)
    opts = ConvertOptions(**base)
    try:
        check_options(opts)
    except ConvertError as exc:
        if source is None:
            raise
        raise RecipeError(f"{source}{' with ' + origin if overrides else ''}: {exc}") from None
    return opts


def recipe_dict(opts: ConvertOptions) -> dict:
    """The recipe of ``opts``: every recipe key, sections as nested mappings (JSON-ready)."""
    doc: dict = {VERSION_KEY: RECIPE_VERSION}
    for key, f in recipe_fields().items():
        section, _, name = key.rpartition(".")
        value = getattr(opts, f.name)
        (doc.setdefault(section, {}) if section else doc)[name] = list(value) if isinstance(value, list) else value
    return doc


def _comment(f: dataclasses.Field) -> str:
    """A recipe line's comment: the flag the key stands for (a --no-X switch sets it false) and the field's note."""
    flag, note = f.metadata.get("flag"), f.metadata.get("note")
    if flag and flag.startswith("--no-"):
        flag += " sets false"
    text = "; ".join(t for t in (flag, note) if t)
    return f"  # {text}" if text else ""


def dump_recipe(opts: ConvertOptions) -> str:
    """``recipe_dict(opts)`` as YAML, each key on its own line with a comment (``_comment``); PyYAML writes each
    value, so that it reads back as written (a float such as 1e-05 as a float, quoted paths)."""
    import yaml

    def line(name: str, value, indent: str = "", comment: str = "") -> str:
        # [value] in flow style is one line ("[[a, b]]", "['re:x$']"); the value is what is inside the brackets
        text = yaml.safe_dump([value], default_flow_style=True, width=1 << 20, allow_unicode=True).strip()
        return f"{indent}{name}: {text[1:-1]}{comment}"

    fields = recipe_fields()
    lines = [f"# vllm-haq {__version__} conversion recipe: haq convert MODEL_DIR OUT_DIR --recipe THIS_FILE, or",
             "# offline.convert_model(MODEL_DIR, OUT_DIR, recipe=THIS_FILE). Keys left out take their defaults;",
             "# relative paths resolve against the current directory (docs/usage.md, Recipes)."]
    for key, value in recipe_dict(opts).items():
        if key == VERSION_KEY:
            lines.append(line(key, value))
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [line(k, v, "  ", _comment(fields[f"{key}.{k}"])) for k, v in value.items()]
        else:
            lines.append(line(key, value, "", _comment(fields[key])))
    return "\n".join(lines) + "\n"


def write_recipe(opts: ConvertOptions, path: str) -> None:
    """Write ``dump_recipe(opts)`` through a temporary file and a rename (as ``write_json_atomic``): a reader never
    sees half a recipe."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(dump_recipe(opts))
    os.replace(path + ".tmp", path)
