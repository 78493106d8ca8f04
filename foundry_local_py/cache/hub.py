"""Any Hugging Face model by name: ``hf.co/<owner>/<repo>[:<quant>]`` -> concrete files.

A GGUF repo usually holds one file per quantization (``...-Q4_K_M.gguf``, ``...-Q8_0.gguf``),
sometimes split in parts (``...-Q8_0-00001-of-00003.gguf``, which llama.cpp opens from the first
part). :func:`resolve_listing` lists the repo at one commit through huggingface-hub's API
(``model_info`` pins ``main`` to a commit, ``list_repo_tree`` gives paths, sizes and LFS sha256s)
and picks:

- a GGUF for a quant (:func:`pick_gguf`): the one asked for, else a Q4_K_M-class default, with
  every part of a split file;
- every file of an ONNX GenAI folder (``subfolder``; it must hold ``genai_config.json``).

The result is a :class:`HuggingFaceSource` pinned to the commit with each file's size and
sha256, which the download path (:mod:`.download`: resume, verification, locks) fetches as is.
Shipped catalog entries name a repo and a quant or subfolder, never file paths, so they resolve
the same way and a path the repo does not have cannot ship.

:func:`register_hub_model` turns a name into a user-catalog entry (so the name works in a
request's ``model``, the CLI, the SDKs and ``/openai/download``); after the download,
:func:`update_from_gguf` records the context length and whether the file has a chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DownloadError, InvalidRequestError, ModelNotFoundError
from .catalog import NAME_PATTERN, Catalog, CatalogModel, HubFile, HuggingFaceSource, Variant

HUB_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,95}/[A-Za-z0-9][A-Za-z0-9._\-]{0,95}$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,31}$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])(?P<q>(?:u?i?q[1-8](?:_[a-z0-9]+)*)|bf16|fp16|f16|fp32|f32)(?=$|[-_.])", re.IGNORECASE
)
DEFAULT_QUANTS = (
    "q4_k_m", "q4_k", "q4_k_s", "q4_k_l", "iq4_xs", "iq4_nl", "q4_0", "q4_1",
    "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q6_k", "q8_0", "q3_k_l", "q3_k_m", "q3_k_s",
    "iq3_m", "iq3_xs", "q2_k", "bf16", "f16", "fp16", "f32", "fp32",
)
"""The default quant: the first of these the repo has (llama.cpp's and Ollama's usual choice)."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    quant: str | None

    @property
    def name(self) -> str:
        """The canonical name (also the catalog alias): ``hf.co/<owner>/<repo>[:<QUANT>]``."""
        return f"hf.co/{self.repo}" + (f":{self.quant.upper()}" if self.quant else "")


def is_hub_alias(alias: str) -> bool:
    """A catalog alias of a model resolved from the hub by name."""
    return alias.lower().startswith("hf.co/")


def is_hub_name(name: str) -> bool:
    return name.strip().lower().startswith(HUB_PREFIXES)


def parse_hub_name(name: str) -> HubRef:
    """``hf.co/owner/repo[:quant]`` (also ``huggingface.co/...``) -> :class:`HubRef`."""
    text = name.strip()
    lower = text.lower()
    for prefix in HUB_PREFIXES:
        if lower.startswith(prefix):
            text = text[len(prefix):]
            break
    else:
        raise InvalidRequestError(f"'{name}' is not a Hugging Face name (hf.co/<owner>/<repo>[:<quant>])")
    repo, _, quant = text.rstrip("/").partition(":")
    if not _REPO.match(repo) or ".." in repo:
        raise InvalidRequestError(f"'{name}': expected hf.co/<owner>/<repo>[:<quant>]")
    if quant and not _QUANT_TAG.match(quant):
        raise InvalidRequestError(f"'{name}': invalid quant tag '{quant}'")
    if quant.lower() == "latest":
        quant = ""
    return HubRef(repo=repo, quant=quant or None)


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    repo: str
    """The repo id as the hub spells it."""
    commit: str
    files: dict[str, HubFile]
    """Every file of the repo at ``commit``, by path, with size and (LFS) sha256 where known."""


def list_repo(repo: str, revision: str = "main", *, token: str | None = None) -> Listing:
    """The repo's files at one commit (``revision`` resolved to a commit first)."""
    from huggingface_hub import HfApi

    from .download import _hub_errors, hub_endpoint, offline_mode

    if offline_mode():
        raise DownloadError(f"cannot list {repo} on the hub: offline mode is on (HF_HUB_OFFLINE)")
    api = HfApi(endpoint=hub_endpoint(), token=token)
    probe = HuggingFaceSource(repo=repo, revision=revision, files=[HubFile(path="(listing)")])
    with _hub_errors(probe, "the file listing"):
        info = api.model_info(repo, revision=revision)
        commit = info.sha or revision
        entries = list(api.list_repo_tree(repo, revision=commit, recursive=True))
    files: dict[str, HubFile] = {}
    for entry in entries:
        path = getattr(entry, "path", None)
        if not path or not hasattr(entry, "size") or getattr(entry, "type", "file") == "directory":
            continue
        lfs = getattr(entry, "lfs", None)
        sha = _lfs_sha256(lfs)
        size = int(entry.size) if getattr(entry, "size", None) else None
        try:
            files[path] = HubFile(path=path, size=size, sha256=sha)
        except ValueError:
            continue  # a path we would not write (absolute, '..'): never offered
    return Listing(repo=str(getattr(info, "id", None) or repo), commit=commit, files=files)


def _lfs_sha256(lfs: Any) -> str | None:
    if lfs is None:
        return None
    value = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value
    return None


# --- choosing files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufChoice:
    quant: str
    """Lower case, as found in the file name (``q4_k_m``)."""
    parts: tuple[HubFile, ...]
    """One file, or every part of a split GGUF in order; llama.cpp opens the first."""

    @property
    def size(self) -> int | None:
        sizes = [p.size for p in self.parts]
        return sum(s for s in sizes if s) if None not in sizes else None


def quant_of(path: str) -> str | None:
    """The quantization named by a GGUF path (file name first, then its folder)."""
    parts = path.split("/")
    name = _SPLIT.sub(lambda m: m["stem"] + ".gguf", parts[-1])
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    for candidate in (stem, *reversed(parts[:-1])):
        found = list(_QUANT_IN_NAME.finditer(candidate))
        if found:
            return found[-1]["q"].lower()
    return None


def gguf_groups(listing: Listing) -> dict[str, GgufChoice]:
    """Every GGUF model in the listing by quant (projector and imatrix files left out)."""
    singles: dict[str, list[HubFile]] = {}
    splits: dict[tuple[str, int], dict[int, HubFile]] = {}
    for path, file in sorted(listing.files.items()):
        base = path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        quant = quant_of(path) or "unknown"
        split = _SPLIT.match(path)
        if split:
            key = (f"{quant}\0{split['stem']}", int(split["count"]))
            splits.setdefault(key, {})[int(split["index"])] = file
        else:
            singles.setdefault(quant, []).append(file)
    groups: dict[str, GgufChoice] = {}
    for (split_key, count), parts in splits.items():
        quant = split_key.split("\0", 1)[0]
        if sorted(parts) != list(range(1, count + 1)):
            continue  # an incomplete split: unusable
        groups.setdefault(quant, GgufChoice(quant, tuple(parts[i] for i in range(1, count + 1))))
    for quant, files in singles.items():
        # Several files of one quant (rare): the shortest path, deterministically.
        groups.setdefault(quant, GgufChoice(quant, (min(files, key=lambda f: (len(f.path), f.path)),)))
    return groups


def pick_gguf(listing: Listing, quant: str | None) -> GgufChoice:
    groups = gguf_groups(listing)
    where = f"hf.co/{listing.repo}"
    if not groups:
        onnx = sorted({p.rsplit("/", 1)[0] for p in listing.files if p.endswith("genai_config.json")})
        hint = (f" It has ONNX GenAI folders ({', '.join(onnx)}): use a catalog entry with"
                " \"subfolder\"." if onnx else "")
        raise InvalidRequestError(
            f"{where} has no GGUF file: only GGUF repos can be used by name.{hint}", param="model"
        )
    available = ", ".join(q.upper() for q in sorted(groups))
    if quant is not None:
        choice = groups.get(quant.lower())
        if choice is None:
            raise InvalidRequestError(
                f"{where} has no {quant.upper()} GGUF; it has: {available}", param="model"
            )
        return choice
    if len(groups) == 1:
        return next(iter(groups.values()))
    for preferred in DEFAULT_QUANTS:
        if preferred in groups:
            return groups[preferred]
    return min(groups.values(), key=lambda g: (g.size or 0, g.quant))


def resolved_source(source: HuggingFaceSource, *, token: str | None = None) -> HuggingFaceSource:
    """``source`` with concrete files at a commit: itself when it already lists files, else the
    GGUF of its ``quant`` or every file under its ``subfolder``, as the hub lists them now."""
    if source.files:
        return source
    listing = list_repo(source.repo, source.revision, token=token)
    if source.quant is not None:
        choice = pick_gguf(listing, source.quant)
        files = list(choice.parts)
        return source.model_copy(update={"revision": listing.commit, "files": files,
                                          "entry": files[0].path})
    prefix = f"{source.subfolder.rstrip('/')}/" if source.subfolder else ""
    inside = [f.model_copy(update={"path": p[len(prefix):]}) for p, f in sorted(listing.files.items())
              if p.startswith(prefix) and "/" not in p[len(prefix):] and not p.endswith(".md")
              and not p.rsplit("/", 1)[-1].startswith(".")]
    if not any(f.path == "genai_config.json" for f in inside):
        raise DownloadError(
            f"{source.repo}@{listing.commit[:12]} has no ONNX GenAI folder at "
            f"'{source.subfolder or '/'}' (no genai_config.json there)"
        )
    return source.model_copy(update={"revision": listing.commit, "files": inside, "entry": None})


# --- registering a name -------------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._\-]+", "-", text.lower()).replace("..", ".").strip("-.") or "model"
    return slug[:100]


def hub_model_entry(ref: HubRef, listing: Listing, choice: GgufChoice) -> CatalogModel:
    owner, repo_name = listing.repo.split("/", 1)
    variant_name = _slug(f"hf-{owner}-{repo_name}-{choice.quant}")
    if not re.match(NAME_PATTERN, variant_name):
        raise InvalidRequestError(f"cannot name a model for hf.co/{listing.repo}")
    files = [p.model_dump(exclude_none=True) for p in choice.parts]
    return CatalogModel.model_validate(
        {
            "alias": HubRef(listing.repo, ref.quant).name,
            "display_name": f"{listing.repo} {choice.quant.upper()}",
            "publisher": _slug(owner),
            "task": "chat-completion",
            "license": "see the model card",
            "context_length": 4096,  # until the file is read (update_from_gguf)
            "description": f"From the Hugging Face hub by name (hf.co/{listing.repo}, "
                           f"commit {listing.commit[:12]}).",
            "variants": [
                {
                    "name": variant_name,
                    "format": "gguf",
                    "device": "cpu",
                    "precision": choice.quant,
                    **({"size_bytes": choice.size} if choice.size else {}),
                    "source": {
                        "kind": "huggingface",
                        "repo": listing.repo,
                        "revision": listing.commit,
                        "files": files,
                        "entry": files[0]["path"],
                    },
                }
            ],
        }
    )


def register_hub_model(cache_dir: Path, catalog: Catalog | None, name: str, *,
                       token: str | None = None, network: bool = True) -> CatalogModel:
    """The catalog entry for ``hf.co/...``: from ``catalog`` or the user catalog when it was
    resolved before, else (``network``) from the hub's listing, written to the user catalog.
    Without ``network`` an unknown name is a 404 that says to download it."""
    from .registry import add_user_models, read_user_models

    ref = parse_hub_name(name)
    key = ref.name.lower()
    if catalog is not None and catalog.model(key) is not None:
        return catalog.model(key)  # type: ignore[return-value]
    for model in read_user_models(cache_dir):
        if model.alias.lower() == key:
            if catalog is not None:
                catalog.add(model)
            return model
    if not network:
        raise ModelNotFoundError(
            name, detail=f"It is not in the cache; run 'foundry-local model download {ref.name}'.")
    listing = list_repo(ref.repo, token=token)
    model = hub_model_entry(ref, listing, pick_gguf(listing, ref.quant))
    add_user_models(cache_dir, [model])
    if catalog is not None:
        catalog.add(model)
    return model


def update_from_gguf(
    cache_dir: Path, catalog: Catalog | None, model: CatalogModel, path: Path
) -> CatalogModel:
    """Record what the downloaded file says: context length, and chat or completion only."""
    from .gguf_info import read_gguf_info
    from .registry import add_user_models

    try:
        info = read_gguf_info(path)
    except (OSError, ValueError):
        return model
    update: dict[str, Any] = {}
    if info.context_length and info.context_length != model.context_length:
        update["context_length"] = info.context_length
    task = "chat-completion" if info.chat_template else "text-completion"
    if task != model.task:
        update["task"] = task
    if info.chat_template and "tool" in info.chat_template and not model.supports_tool_calling:
        update["supports_tool_calling"] = True
    if not update:
        return model
    fresh = model.model_copy(update=update)
    add_user_models(cache_dir, [fresh])
    if catalog is not None:
        catalog.add(fresh)
    return fresh


def ensure_hub_model(cache_dir: Path, catalog: Catalog, name: str, *, token: str | None = None,
                     network: bool = True) -> tuple[CatalogModel, Variant | None]:
    """``catalog.lookup(name)``, resolving ``hf.co/...`` names the catalog does not know yet
    (from the user catalog; with ``network``, from the hub)."""
    if not is_hub_name(name):
        return catalog.lookup(name)
    return register_hub_model(cache_dir, catalog, name, token=token, network=network), None
