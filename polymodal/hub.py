"""Models the user already has in the local Hugging Face cache: hub repo ids and open_clip pretrained tags.

Everything here goes through ``huggingface_hub`` with ``local_files_only=True``: polymodal reads the cache
that ``huggingface_hub`` (``hf download``, ``transformers``, ``open_clip``) filled, and never touches the
network unless the user sets ``POLYMODAL_ALLOW_DOWNLOADS=1`` (``HF_HUB_OFFLINE=1`` still wins).

Two kinds of names resolve here:

- a repo id, ``"hf-hub:ORG/NAME"`` (or ``"hf-hub:ORG/NAME@REVISION"``), or a bare ``"ORG/NAME"`` that is not
  a path: the snapshot directory of that repo, which the resolver then reads like any model directory
  (Hugging Face CLIP / SigLIP, open_clip, or polymodal);
- an open_clip pretrained tag for a registered architecture, ``create_model("clip-vit-b-32",
  pretrained="laion2b_s34b_b79k")``: open_clip's own table of tags names the hub repo and file it loads, so
  polymodal finds the same file in the same cache.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = [
    "ALLOW_DOWNLOADS_ENV",
    "HUB_PREFIX",
    "OPEN_CLIP_NAMES",
    "ModelNotFoundError",
    "PretrainedTag",
    "cached_file",
    "hub_cache_dir",
    "hub_repo_of",
    "is_repo_id",
    "open_clip_pretrained",
    "snapshot_of",
]

HUB_PREFIX = "hf-hub:"
ALLOW_DOWNLOADS_ENV = "POLYMODAL_ALLOW_DOWNLOADS"

# Registered polymodal architectures that are open_clip architectures, by open_clip's name for them: the
# one place that pairs them, so open_clip's pretrained tags apply to these names.
OPEN_CLIP_NAMES = {"clip-vit-b-32": "ViT-B-32", "clip-vit-b-16": "ViT-B-16", "clip-rn50": "RN50"}

# the filenames open_clip looks for in a hub repo whose tag names none, in its order of preference
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# ORG/NAME as the hub spells repo ids (letters, digits, "-", "_", "."), optionally @REVISION
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class ModelNotFoundError(InputError, FileNotFoundError):
    """A model reference names nothing polymodal can find: no registered name, path or cached hub repo."""


def is_repo_id(ref: str) -> bool:
    """``ref`` is spelled as a hub repo id (``hf-hub:ORG/NAME`` always; a bare ``ORG/NAME`` only when it
    does not look like a relative path: no ``./``, no file suffix, exactly one ``/``)."""
    if ref.startswith(HUB_PREFIX):
        return True
    return bool(_REPO_ID.match(ref)) and not ref.startswith(".") and not ref.endswith((".json", ".safetensors"))


def hub_repo_of(ref: object) -> str | None:
    """The repo id (``ORG/NAME[@REVISION]``) a model reference names, or ``None`` when it names no hub repo:
    ``hf-hub:...`` always does; a bare ``ORG/NAME`` does only when no such path exists (a path wins)."""
    if not isinstance(ref, str):
        return None
    if ref.startswith(HUB_PREFIX):
        return ref[len(HUB_PREFIX) :]
    return ref if is_repo_id(ref) and not Path(ref).exists() else None


def hub_cache_dir() -> Path:
    """The cache ``huggingface_hub`` uses now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else its default.

    Read from the environment at each call, because ``huggingface_hub.constants`` is fixed when the
    library is first imported, and a user (or a test) may set the variables later in the same process.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.default_cache_path).expanduser()


def _downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes")


def _split_repo(ref: str) -> tuple[str, str | None]:
    repo = ref[len(HUB_PREFIX) :] if ref.startswith(HUB_PREFIX) else ref
    repo, _, revision = repo.partition("@")
    if not _REPO_ID.match(repo):
        raise InputError(f"{ref!r} is not a Hugging Face repo id; expected {HUB_PREFIX}ORG/NAME[@REVISION]")
    return repo, revision or None


def _not_cached(what: str, repo: str, cache: Path, extra: str = "") -> ModelNotFoundError:
    folder = cache / ("models--" + repo.replace("/", "--"))
    return ModelNotFoundError(
        f"{what} is not in the local Hugging Face cache (looked in {str(folder)!r}{extra}); polymodal reads hub "
        f"models only from the cache: fetch it first (e.g. `hf download {repo}`), point HF_HUB_CACHE or HF_HOME "
        f"at the cache that has it, or set {ALLOW_DOWNLOADS_ENV}=1 to let polymodal download it"
    )


def snapshot_of(ref: str, not_a_path: bool = False) -> Path:
    """The local snapshot directory of the hub repo ``ref`` names (see ``is_repo_id``).

    Args:
        ref: ``hf-hub:ORG/NAME[@REVISION]`` or ``ORG/NAME``.
        not_a_path: ``ref`` was also tried as a path, which does not exist; the error says so too.

    Raises:
        ModelNotFoundError: the repo (or that revision of it) is not cached, saying where polymodal looked.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, revision = _split_repo(ref)
    cache = hub_cache_dir()
    try:
        path = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache,
            local_files_only=not _downloads_allowed(),
            library_name="polymodal",
        )
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        extra = f", revision {revision!r}" if revision else ""
        extra += f"; and no directory {ref!r} exists" if not_a_path else ""
        raise _not_cached(repr(ref), repo, cache, extra) from None
    return Path(path)


def cached_file(repo: str, filename: str) -> Path:
    """One file of the hub repo ``repo`` (``ORG/NAME``) from the local cache, or a ``ModelNotFoundError``
    saying where polymodal looked."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=not _downloads_allowed()))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise _not_cached(f"{filename} of {repo!r}", repo, cache) from None


@dataclass(frozen=True)
class PretrainedTag:
    """Where the weights of an open_clip pretrained tag are, and what the tag changes in the architecture.

    Attributes:
        path: the cached weights file.
        source: ``"open_clip ARCH/TAG (hf-hub:REPO/FILE)"``, for the model card.
        overrides: config overrides the tag needs (``quick_gelu`` for OpenAI's weights; its preprocessing).
    """

    path: Path
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)


def open_clip_pretrained(name: str, tag: str) -> PretrainedTag:
    """The cached weights of open_clip's pretrained ``tag`` for the registered architecture ``name``.

    Raises:
        InputError: ``name`` is not an open_clip architecture, open_clip is not installed, or it has no such tag.
        ModelNotFoundError: the tag's file is not in the local cache.
    """
    arch = OPEN_CLIP_NAMES.get(name)
    if arch is None:
        raise InputError(
            f"pretrained={tag!r} is neither an existing path nor usable as an open_clip tag: {name!r} is not an "
            f"open_clip architecture (those are {sorted(OPEN_CLIP_NAMES)})"
        )
    try:
        import open_clip
    except ImportError:
        raise InputError(
            f"pretrained={tag!r} reads as an open_clip tag, and open_clip's table of tags needs open_clip: "
            "pip install open_clip_torch (or give the weights file's path)"
        ) from None
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise InputError(
            f"pretrained={tag!r} is not a path, nor an open_clip tag of {arch} with hub weights; its tags are {tags}"
        )
    repo, filename = _repo_and_file(cfg["hf_hub"])
    overrides: dict[str, Any] = {"quick_gelu": True} if cfg.get("quick_gelu") else {}
    preprocess = {k: list(cfg[k]) if k in ("mean", "std") else cfg[k] for k in _PREPROCESS_KEYS if cfg.get(k)}
    if preprocess:
        overrides["preprocess"] = preprocess
    candidates = (filename,) if filename else _OPEN_CLIP_FILES
    for candidate in candidates:
        with contextlib.suppress(ModelNotFoundError):
            path = cached_file(repo, candidate)
            return PretrainedTag(path, f"open_clip {arch} pretrained={tag} ({HUB_PREFIX}{repo}/{candidate})", overrides)
    what = f"open_clip's {arch} pretrained={tag!r} ({HUB_PREFIX}{repo}, file {' or '.join(candidates)})"
    raise _not_cached(what, repo, hub_cache_dir())


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _repo_and_file(hf_hub: str) -> tuple[str, str]:
    """open_clip writes ``"ORG/NAME/"`` (its default files) or ``"ORG/NAME/FILE"``."""
    parts = hf_hub.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])
