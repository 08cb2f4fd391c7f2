"""Finding checkpoint files: in a local folder, or on the Hugging Face Hub through its cache."""

from __future__ import annotations

import os
from pathlib import Path


def is_local(name_or_path: str | os.PathLike) -> bool:
    text = str(name_or_path)
    return os.path.isdir(text) or text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    required: bool = True,
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path | None:
    """Path of `filename` in a local folder or a hub repo; None when absent and not `required`."""
    if is_local(name_or_path):
        folder = Path(os.path.expanduser(str(name_or_path))) / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; point at a folder holding {filename} or a hub id")
        path = folder / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{path} does not exist: the folder {folder} has no {filename}")
        return None

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            hf_hub_download(
                str(name_or_path), filename, subfolder=subfolder or None, revision=revision, cache_dir=cache_dir,
                local_files_only=local_files_only, token=token, force_download=force_download,
            )
        )
    except RepositoryNotFoundError:
        raise OSError(
            f"{name_or_path!r} is neither a local folder nor a hub repo you can reach; check the name, "
            "or pass `token=` for a gated or private repo"
        ) from None
    # LocalEntryNotFoundError is a subclass of EntryNotFoundError: it must be caught first.
    except LocalEntryNotFoundError:
        if not required and _cached_repo_exists(name_or_path, cache_dir):
            return None
        raise OSError(
            f"cannot fetch {filename} of {name_or_path!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) "
            "and the file is not in the local cache. Download it once while online, or point at a local folder "
            "that holds the checkpoint"
        ) from None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"the hub repo {name_or_path} has no file {filename}") from None
        return None


def _cached_repo_exists(repo_id: str | os.PathLike, cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(str(repo_id), "config.json", cache_dir=cache_dir) is not None
