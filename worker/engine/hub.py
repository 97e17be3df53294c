"""The Hugging Face Hub, and only the Hub: what an `hf:` source or dataset names is resolved to a commit
and downloaded into mixq's cache, then loaded from there with no further network access.

transformers and datasets both accept a bare name and prefer a local folder of that name when one
exists, so they are never handed the user's string: `hf:leak` can only ever mean the Hub's `leak`.
Downloads are pinned to the resolved commit and limited to the files loading needs (safetensors
weights, configs, tokenizer files for models; data files for datasets), so no pickle or code is fetched.
`HF_ENDPOINT` (read on each call) points at another Hub-compatible server, as with huggingface_hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mixq.hub")

MODEL = "model"
DATASET = "dataset"
DEFAULT_TIMEOUT = 10.0
# A config.json is a few kB; a 50 MB one cost the API 100 MB of memory to parse.
MAX_CONFIG_BYTES = 1 << 20
# Top-level files only (`*/*` is ignored): weights, configs, and what tokenizers and image processors read.
MODEL_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken"]
DATASET_FILES = ["*.parquet", "*.arrow", "*.csv", "*.tsv", "*.json", "*.jsonl", "*.txt", "README.md"]


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def resolve(repo_id: str, revision: str | None, repo_type: str = MODEL, timeout: float = DEFAULT_TIMEOUT,
            token: bool = False) -> str:
    """The commit sha `revision` (default: main) names now, or an InputError saying why not. Anonymous
    unless `token`: only then does the process's HF_TOKEN go to the Hub (see `token_for`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    what = f"{repo_type} {repo_id!r}"
    try:
        return HfApi(endpoint=_endpoint(), token=token_for(token)).repo_info(repo_id, revision=revision,
                                                                              repo_type=repo_type, timeout=timeout).sha
    except RevisionNotFoundError:
        raise InputError(f"revision {revision!r} of {what} does not exist on the Hub") from None
    except RepositoryNotFoundError:  # also gated or private repositories without a token
        raise InputError(f"{what} was not found on the Hub (or is private or gated)") from None
    except Exception as exc:  # timeouts, connection errors, Hub outages
        log.warning("resolving %s@%s failed", what, revision, exc_info=True)
        raise InputError(f"cannot reach the Hub to resolve {what} ({type(exc).__name__}; "
                         f"timeout {timeout:g} s)") from None


def token_for(allowed: bool) -> bool | None:
    """huggingface_hub's `token` argument: None sends the process's HF_TOKEN, False sends none. A worker's
    token is the operator's; a tenant's job uses it only where the operator allows that tenant
    (MIXQ_HF_TOKEN_TENANTS), so nobody else can reach the operator's private or gated repositories."""
    return None if allowed else False


def config(repo_id: str, revision: str | None, cache_dir: Path, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """A model's config.json, fetched anonymously (the API reads an image model's input size before it
    accepts a job); one over MAX_CONFIG_BYTES is refused before it is downloaded (and after, where the Hub did
    not say its size)."""
    import json

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    sha = resolve(repo_id, revision, MODEL, timeout)
    too_large = InputError(f"the config.json of {repo_id!r}@{sha[:12]} is over {MAX_CONFIG_BYTES:,} bytes")
    try:
        metadata = get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=sha, endpoint=_endpoint()),
                                        token=False, timeout=timeout)
        if metadata.size is not None and metadata.size > MAX_CONFIG_BYTES:
            raise too_large
        path = Path(hf_hub_download(repo_id, "config.json", revision=sha, endpoint=_endpoint(),
                                    etag_timeout=timeout, token=False, cache_dir=Path(cache_dir) / "hub"))
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise too_large
        return json.loads(path.read_text())
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read the config of {repo_id!r}@{sha[:12]} ({type(exc).__name__})") from None


def download(repo_id: str, revision: str | None, cache_dir: Path, repo_type: str = MODEL,
             timeout: float = DEFAULT_TIMEOUT, token: bool = False) -> tuple[Path, str]:
    """Resolve, then fetch the commit's loadable files; returns (snapshot folder, commit sha). `token` as
    for `resolve`."""
    from huggingface_hub import snapshot_download

    sha = resolve(repo_id, revision, repo_type, timeout, token)
    patterns = MODEL_FILES if repo_type == MODEL else DATASET_FILES
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=sha, cache_dir=Path(cache_dir) / "hub",
                                   allow_patterns=patterns, ignore_patterns=["*/*"] if repo_type == MODEL else None,
                                   endpoint=_endpoint(), etag_timeout=timeout, token=token_for(token))
    except Exception as exc:
        log.warning("downloading %s %s@%s failed", repo_type, repo_id, sha, exc_info=True)
        raise InputError(f"cannot download {repo_type} {repo_id!r}@{sha[:12]} from the Hub "
                         f"({type(exc).__name__})") from None
    return Path(folder), sha
