"""Resolving a model name: a local folder, or a hub id fetched (or found in the cache) with huggingface_hub.

A hub pipeline is fetched in two steps: `model_index.json` first, to learn the components, then one
`snapshot_download` restricted to the files lcmkit reads: each component's json/txt files (configs, tokenizer
files) and the weights of the requested variant only, safetensors preferred over `.bin`. Weight files are named
exactly (not by glob), so an offline look-up checks just those files against huggingface_hub's cached tree listing.

Offline (`HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1` or `local_files_only=True`) only the cache is read; a model
that is not there raises `ModelNotCachedError`, which says how to get it.

Online, the hub is first asked once, without retries (`_unreachable`): huggingface_hub retries a look-up whose
file is not cached five times with backoff (about 30 s, a warning per try), so a machine without network would
wait and print for half a minute. When that one request fails, the cache is used as if offline, and a model
that is not cached fails at once with one `ModelNotCachedError`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path, PurePosixPath

from lcmkit.config import read_config_json
from lcmkit.io.errors import MissingModelFileError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
COMPONENT_FILE_PATTERNS = (
    "*.json",
    "*.txt",
)  # configs, tokenizer vocab/merges, scheduler and processor configs
# model_index.json may list components lcmkit does not load (folders.load_components ignores the image encoder
# (load_ip_adapter loads the adapter's own)): their configs are fetched, their weights are not.
UNUSED_COMPONENTS = ("image_encoder",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
PROBE_TIMEOUT_S = 4.0  # a metadata request answers in well under a second on a working link


class ModelNotCachedError(MissingModelFileError):  # a FileNotFoundError as before, and a ModelFileError
    """A hub model was asked for while downloading is off, and the local cache does not have it (or not all of it)."""


def is_hub_id(name: str) -> bool:
    """`owner/name` with the characters the hub allows (no `--` or `..`, no leading/trailing `-` or `.`)."""
    if not _REPO_ID.match(name) or "--" in name or ".." in name:
        return False
    return all(not part.startswith(("-", ".")) and not part.endswith(("-", ".")) for part in name.split("/"))


def is_offline(local_files_only: bool = False) -> bool:
    """True when the hub must not be contacted.

    The environment is read at call time as well as through huggingface_hub's constant (which it reads once,
    at import), so `HF_HUB_OFFLINE=1` set after import is honoured too.
    """
    from huggingface_hub import constants

    env = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(local_files_only or constants.HF_HUB_OFFLINE or any(v in _TRUE for v in env))


def _cache_dir(cache_dir: str | Path | None) -> str | None:
    """`cache_dir`, else `HF_HUB_CACHE` as set now, else None (huggingface_hub's default)."""
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    return os.environ.get("HF_HUB_CACHE") or None


def weight_variant(filename: str) -> str | None:
    """The variant infix of a weights file: `model.fp16.safetensors` -> "fp16", sharded
    `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` -> "fp16", `model.safetensors` -> None."""
    name = PurePosixPath(filename).name
    for suffix in WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = _SHARD.sub("", name)
    return stem.split(".", 1)[1] if "." in stem else None


def _component_names(model_index: dict) -> list[str]:
    """Entries `name: [library, class]` with both set; `[null, null]` marks an absent optional component."""
    return [
        name
        for name, entry in model_index.items()
        if not name.startswith("_")
        and isinstance(entry, (list, tuple))
        and len(entry) == 2
        and all(isinstance(v, str) for v in entry)
    ]


def _pick_weights(files: list[str], variant: str | None, component: str) -> list[str]:
    """The files of one component that a loader reads: the requested variant, safetensors if it has them."""
    if not files:  # tokenizer, scheduler, feature extractor: configs only
        return []
    by_variant: dict[str | None, list[str]] = {}
    for f in files:
        by_variant.setdefault(weight_variant(f), []).append(f)
    chosen = by_variant.get(variant, [])
    if not chosen and variant is not None and by_variant.get(None):
        # diffusers does the same: a component without the variant (often the safety checker) keeps its default
        logger.warning("%s has no %r weights; fetching its default weights instead", component, variant)
        chosen = by_variant[None]
    if not chosen:
        logger.warning(
            "%s has no weights for variant %r (variants present: %s)",
            component,
            variant,
            sorted(str(v) for v in by_variant),
        )
        return []
    safetensors = [f for f in chosen if f.endswith(".safetensors")]
    return sorted(safetensors or chosen)


def allow_patterns(
    model_index: dict,
    repo_files: Iterable[str],
    variant: str | None = None,
    subfolder: str | None = None,
    skip_components: Collection[str] = (),
) -> list[str]:
    """`snapshot_download` patterns for exactly what loading the pipeline reads.

    `repo_files` are repo-relative posix paths (the hub's file list, or what the cache holds). Weights are named
    one by one (glob-escaped); config and tokenizer files by `<component>/*.json|*.txt`.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    files = list(repo_files)
    patterns = [f"{prefix}model_index.json"]
    for name in _component_names(model_index):
        if name in skip_components:
            continue
        folder = f"{prefix}{name}/"
        patterns += [folder + p for p in COMPONENT_FILE_PATTERNS]
        if name in UNUSED_COMPONENTS:
            continue
        weights = [
            f
            for f in files
            if f.startswith(folder) and "/" not in f[len(folder) :] and f.endswith(WEIGHT_SUFFIXES)
        ]
        patterns += [glob.escape(f) for f in _pick_weights(weights, variant, name)]
    return patterns


def _not_cached(
    repo_id: str, offline_reason: str, cache_dir: str | None, cause: Exception
) -> ModelNotCachedError:
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    return ModelNotCachedError(
        f"'{repo_id}' is not a local path, and the hub model '{repo_id}' is not (completely) in the local "
        f"Hugging Face cache ({where}), while {offline_reason}. To fix: download it once with the network on "
        f"(the same call without HF_HUB_OFFLINE=1 / local_files_only=True, or `hf download {repo_id}`), "
        f"or pass the path of a local diffusers-layout folder. (huggingface_hub: {cause})"
    )


def _unreachable_error(repo_id: str, cache_dir: str | None, cause: Exception) -> ModelNotCachedError:
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    why = " ".join(str(cause).split())[:200] or type(cause).__name__
    return ModelNotCachedError(
        f"'{repo_id}' is not a local path, the hub model '{repo_id}' is not (completely) in the local Hugging Face "
        f"cache ({where}), and the hub at {constants.ENDPOINT} could not be reached ({why}). To fix: check the "
        f"network (and HF_ENDPOINT), download it once with `hf download {repo_id}`, or pass the path of a local "
        "diffusers-layout folder"
    )


def _probe_timeout() -> float:
    """Seconds the one look-up may take: HF_HUB_ETAG_TIMEOUT when set (slow links), else PROBE_TIMEOUT_S."""
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return PROBE_TIMEOUT_S


def _unreachable(
    repo_id: str, filename: str, subfolder: str | None, revision: str | None, token: str | bool | None
) -> Exception | None:
    """Ask the hub once, without retries, for `filename`'s metadata: the error when it cannot be reached (no
    connection, timeout, a 408/5xx answer), else None. Other answers (404, 401) are left to hf_hub_download,
    whose errors name them."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    url = hf_hub_url(repo_id, filename, subfolder=subfolder or None, revision=revision)
    try:
        get_hf_file_metadata(url, token=token, timeout=_probe_timeout())
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return e if status is None or status == 408 or status >= 500 else None
    except Exception as e:  # connection refused, DNS, TLS, timeouts: each HTTP client names them its own way
        return e
    return None


def _offline_reason(local_files_only: bool) -> str:
    if local_files_only:
        return "local_files_only=True forbids downloading"
    return "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)"


def hub_file(
    repo_id: str,
    filename: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """One file of a hub repo, from the cache or downloaded; errors say what was missing and how to fix it."""
    return _hub_file(
        repo_id, filename, subfolder, revision, cache_dir, local_files_only, token, force_download
    )[0]


def _hub_file(
    repo_id: str,
    filename: str,
    subfolder: str | None,
    revision: str | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
    token: str | bool | None,
    force_download: bool,
) -> tuple[Path, bool]:
    """`hub_file`, and whether only the cache could be used (offline, or the hub unreachable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline(local_files_only)
    cache = _cache_dir(cache_dir)
    down = None if offline else _unreachable(repo_id, filename, subfolder, revision, token)
    if down is not None:
        logger.info("the hub could not be reached (%s); looking in the local cache", down)
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline or down is not None,
            token=token,
            force_download=force_download and not offline and down is None,
        )
    except LocalEntryNotFoundError as e:
        if down is not None:
            raise _unreachable_error(repo_id, cache, down) from e
        reason = _offline_reason(local_files_only) if offline else "the hub could not be reached"
        raise _not_cached(repo_id, reason, cache, e) from e
    except RepositoryNotFoundError as e:  # also GatedRepoError
        raise ValueError(
            f"hub repo '{repo_id}' was not found, or it is private or gated and no valid token was given "
            f"(pass token=... or log in with `hf auth login`): {e}"
        ) from e
    except RevisionNotFoundError as e:
        raise ValueError(f"hub repo '{repo_id}' has no revision {revision!r}: {e}") from e
    except EntryNotFoundError as e:
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise FileNotFoundError(f"hub repo '{repo_id}' has no file '{where}': {e}") from e
    return Path(path), offline or down is not None


def _snapshot_root(file_in_snapshot: Path, subfolder: str | None) -> Path:
    """`.../snapshots/<commit>` from a path inside it (hf_hub_download returns `.../snapshots/<commit>/<file>`)."""
    depth = len(PurePosixPath(subfolder.strip("/")).parts) if subfolder else 0
    return file_in_snapshot.parents[depth]


def _cached_files(repo_id: str, commit: str, cache_dir: str | None, snapshot: Path) -> list[str]:
    """The repo's file list as the cache knows it, without the network.

    huggingface_hub >= 2 keeps the tree listing of each downloaded commit (`trees/<commit>.json`): the whole
    repo, so a variant that was never downloaded is still seen as missing (not silently replaced by the default
    weights). Without that listing, the files present in the snapshot folder are all we know.
    """
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        get_cached_repo_tree = None
    if get_cached_repo_tree is not None:
        try:
            return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir))
        except Exception as e:  # no listing cached for this commit (e.g. filled by hf_hub_download only)
            logger.debug("no cached tree listing for %s@%s: %s", repo_id, commit, e)
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _repo_files(
    repo_id: str, commit: str, token: str | bool | None, cache_dir: str | None, snapshot: Path
) -> tuple[list[str], bool]:
    """The hub's file list for `commit`; if the hub cannot be asked, the cache's (and offline=True)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=commit, token=token), False
    except Exception as e:  # connection errors differ between huggingface_hub versions (requests, httpx)
        logger.warning("could not list the files of '%s' on the hub (%s); using the local cache", repo_id, e)
        return _cached_files(repo_id, commit, cache_dir, snapshot), True


def download_pipeline(
    repo_id: str,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str | None = None,
    skip_components: Collection[str] = (),
) -> Path:
    """The cached snapshot folder of a hub pipeline, holding the files `allow_patterns` selects."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    index_file, offline = _hub_file(
        repo_id, "model_index.json", subfolder, revision, cache_dir, local_files_only, token, force_download
    )
    snapshot = _snapshot_root(index_file, subfolder)
    commit = snapshot.name  # pins the file list and the snapshot to the commit model_index.json came from
    model_index = read_config_json(index_file)  # a JSON object, or a ModelFileError naming the file
    cache = _cache_dir(cache_dir)
    if offline:  # offline mode, or the hub just failed to answer: the cache alone
        files = _cached_files(repo_id, commit, cache, snapshot)
    else:
        files, offline = _repo_files(repo_id, commit, token, cache, snapshot)
    patterns = allow_patterns(model_index, files, variant, subfolder, skip_components)
    logger.info("fetching %s@%s: %s", repo_id, commit[:10], patterns)
    try:
        folder = snapshot_download(
            repo_id,
            revision=commit,
            cache_dir=cache,
            local_files_only=offline,
            token=token,
            force_download=force_download and not offline,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError as e:  # also huggingface_hub 2.x's IncompleteSnapshotError
        reason = (
            _offline_reason(local_files_only)
            if is_offline(local_files_only)
            else "the hub could not be reached"
        )
        raise _not_cached(repo_id, reason, cache, e) from e
    return Path(folder) / subfolder.strip("/") if subfolder else Path(folder)


def resolve_pretrained(
    name_or_path: str | Path,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str | None = None,
    skip_components: Collection[str] = (),
) -> Path:
    """A local folder as it is (joined with `subfolder`); a hub id `owner/name` as its cached snapshot folder.

    `skip_components` names components the caller replaces (e.g. `safety_checker=None`), whose weights need
    not be fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists():
        raise ValueError(
            f"{str(name_or_path)!r} is a file, not a folder. from_pretrained needs a diffusers-layout folder "
            "(with model_index.json) or a hub id; load a single .safetensors/.ckpt checkpoint with from_single_file"
        )
    name = str(name_or_path)
    if not is_hub_id(name):
        raise ValueError(
            f"{name!r} is neither an existing local folder nor a hub repo id ('owner/name', e.g. "
            "'SimianLuo/LCM_Dreamshaper_v7'). Pass the path of a diffusers-layout folder (with model_index.json) "
            "or a hub id."
        )
    return download_pipeline(
        name,
        variant=variant,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        revision=revision,
        token=token,
        force_download=force_download,
        subfolder=subfolder,
        skip_components=skip_components,
    )
