"""Hugging Face model ids: the one place an ``ORG/NAME`` becomes a local directory.

``haq convert ORG/NAME OUT`` (offline.cli) and the vLLM plugin (vllm_haq.vllm.checkpoint, which reads a served
id's checkpoint files and routing statistics) both resolve ids here, so that both find the files where vLLM and
transformers put them: ``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HUB_CACHE`` /
``HF_HOME``, or a ``cache_dir``), at a ``revision`` (branch, tag or commit; default ``main``), with
``local_files_only`` taken from ``HF_HUB_OFFLINE`` exactly as vLLM passes it
(vllm/model_executor/model_loader/weight_utils.py:461 and :514-523 in vLLM 0.32). A local directory is used
as it is. Every failure is a :class:`ModelNotFoundError` naming the id and saying where it was looked for,
instead of huggingface_hub's stack trace.
"""

from __future__ import annotations

import os

from vllm_haq.errors import HAQError

# What a conversion reads from a model repository: config, index and generation config (json), weights
# (safetensors), tokenizer files (json/txt/model), chat template (jinja), and the files the output carries on.
CARD_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "COPYING*", "USE_POLICY*", "README*",
              "license*", "licence*", "notice*", "copying*", "readme*")
SOURCE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", *CARD_FILES)
# Never weights of the Hugging Face layout: Mistral's consolidated copy and Meta's original/ folder would
# double the download (vLLM skips them too, through the index: weight_utils.py:476-491 in vLLM 0.32).
SOURCE_IGNORE = ("original/*", "consolidated*.safetensors")
# What serving a HAQ checkpoint reads beyond vLLM's own downloads: config and index (json), the shards for the
# checkpoint validation, and haq_routing.safetensors, which vLLM skips when an index lists the weights.
CHECKPOINT_FILES = ("*.json", "*.safetensors")


class ModelNotFoundError(HAQError, ValueError):
    """A model given by name is neither a local directory nor obtainable from the Hugging Face hub or cache."""


def is_model_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``ORG/NAME`` or ``NAME``) rather than a path: not an existing path,
    no leading ``/``, ``.`` or ``~``, and accepted by huggingface_hub's own id check."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or os.path.exists(name) or name.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def snapshot_commit(path: str) -> str | None:
    """The commit of a snapshot directory of the hub cache (``.../snapshots/<commit>``), else None."""
    parent, commit = os.path.split(os.path.normpath(path))
    return commit if os.path.basename(parent) == "snapshots" else None


def resolve_model(model: str, revision: str | None = None, cache_dir: str | None = None,
                  allow_patterns=SOURCE_FILES, ignore_patterns=SOURCE_IGNORE) -> str:
    """The local directory of ``model``: itself when it is a directory, else the snapshot of the hub id in the
    cache (downloaded first unless ``HF_HUB_OFFLINE``). ``revision`` and ``cache_dir`` apply to ids only."""
    if os.path.isdir(model):
        return model
    if not is_model_id(model):
        raise ModelNotFoundError(f"{model}: not a directory (nor a Hugging Face model id ORG/NAME)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = bool(constants.HF_HUB_OFFLINE)
    label = f"{model} (revision {revision})" if revision else model
    cache = os.path.abspath(os.path.expanduser(cache_dir or constants.HF_HUB_CACHE))
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache_dir, allow_patterns=list(allow_patterns),
                                 ignore_patterns=list(ignore_patterns or []) or None, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        # huggingface_hub >= 2 tells an interrupted download apart (a subclass); older versions have no such class
        if isinstance(exc, getattr(hub_errors, "IncompleteSnapshotError", ())):
            raise ModelNotFoundError(f"{label}: the Hugging Face cache {cache} holds an incomplete snapshot of it "
                                     f"({_brief(exc)}); download it again with network access") from None
        if offline:
            raise ModelNotFoundError(
                f"{label}: not a local directory, and not in the Hugging Face cache {cache} (HF_HUB_OFFLINE=1: "
                f"nothing is downloaded); download it first (hf download {model}"
                f"{f' --revision {revision}' if revision else ''}), point HF_HUB_CACHE / --cache-dir at the cache "
                "holding it, or unset HF_HUB_OFFLINE") from None
        raise ModelNotFoundError(f"{label}: not a local directory, not in the Hugging Face cache {cache}, and the "
                                 f"Hub could not be reached ({_brief(exc)})") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{model}: the Hugging Face Hub has no revision {revision!r} of it") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{label}: no such model on the Hugging Face Hub (or it is private or gated: "
                                 "log in with `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise ModelNotFoundError(f"{label}: download from the Hugging Face Hub failed ({_brief(exc)})") from None


def config_dir(model: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A directory holding ``model``'s config.json (for an id only that file is fetched): enough to tell whether
    it is a quantized checkpoint (``haq serve``, ``vllm_haq.vllm.scoring.make_llm``)."""
    return resolve_model(model, revision, cache_dir, allow_patterns=("config.json",), ignore_patterns=())


def _brief(exc: Exception) -> str:
    """huggingface_hub's message on one line (its messages span several, with hints about its own arguments)."""
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__
