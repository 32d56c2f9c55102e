"""A Hugging Face hub cache written on disk from local model directories, for tests without network.

huggingface_hub fills its cache only by downloading, so the tests write what a download leaves
(``models--ORG--NAME/blobs/<id>``, ``snapshots/<commit>/<file>`` symlinks into ``blobs``, ``refs/<branch>``
holding the commit): blob ids as the Hub names them (git blob SHA-1, SHA-256 of LFS files such as safetensors),
a commit id derived from the files. ``huggingface_hub.scan_cache_dir`` reads it back as a real cache
(tests/test_hub.py checks that), and ``snapshot_download(..., local_files_only=True)`` resolves ids in it.
"""

from __future__ import annotations

import hashlib
import os
import shutil

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model")


def _blob_id(path: str, lfs: bool) -> str:
    h = hashlib.sha256() if lfs else hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add_snapshot(cache: str, repo_id: str, src_dir: str, branch: str | None = "main",
                 extra: dict[str, str] | None = None) -> str:
    """Put ``src_dir``'s files (plus ``extra``: name -> text) in ``cache`` as one commit of model ``repo_id``,
    with ``refs/<branch>`` pointing at it (``branch=None``: reachable by its commit id only); returns the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    staging = os.path.join(repo, ".staging")
    os.makedirs(staging, exist_ok=True)
    files = {name: os.path.join(src_dir, name) for name in sorted(os.listdir(src_dir))
             if os.path.isfile(os.path.join(src_dir, name))}
    for name, text in (extra or {}).items():
        files[name] = os.path.join(staging, name)
        with open(files[name], "w", encoding="utf-8") as f:
            f.write(text)
    blobs = {name: _blob_id(path, name.endswith(LFS_SUFFIXES)) for name, path in files.items()}
    commit = hashlib.sha1("".join(f"{n}:{b}\n" for n, b in sorted(blobs.items())).encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, path in files.items():
        blob = os.path.join(repo, "blobs", blobs[name])
        if not os.path.exists(blob):
            shutil.copyfile(path, blob)
        link = os.path.join(snapshot, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "..", "blobs", blobs[name]), link)
    shutil.rmtree(staging)
    if branch is not None:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", branch), "w") as f:
            f.write(commit)  # no newline, as huggingface_hub writes it
    return commit
