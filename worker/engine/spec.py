"""The SOURCE grammar and model revisions, torch-free: the API checks sources with it, the engine loads them.

- `hf:<repo_id>[@revision]`: a Hugging Face Hub model; `local:<dir>` (or a plain path): a folder under the
  allowed root; `builtin:<name>`: an offline model built by the project.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .catalogue import BUILTIN_NAMES, builtin_version
from .errors import InputError
from .paths import HF_REPO_ID, HF_REVISION, resolve_under_root


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # hf | local | builtin
    id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}" + (f"@{self.revision}" if self.revision else "")


def parse_source(source: str) -> ModelSpec:
    """Validate the syntax of a SOURCE string; filesystem checks happen in `load_model`."""
    if not isinstance(source, str) or not source.strip():
        raise InputError("model SOURCE is empty")
    source = source.strip()
    scheme, sep, rest = source.partition(":")
    if not sep:
        scheme, rest = "local", source
    if scheme == "builtin":
        if rest not in BUILTIN_NAMES:
            raise InputError(f"unknown builtin model {rest!r}; available: {', '.join(sorted(BUILTIN_NAMES))}")
        return ModelSpec("builtin", rest)
    if scheme == "hf":
        repo_id, _, revision = rest.partition("@")
        if not HF_REPO_ID.fullmatch(repo_id):
            raise InputError(f"invalid Hugging Face model ID {repo_id!r}: expected [namespace/]name")
        if revision and not HF_REVISION.fullmatch(revision):
            raise InputError(f"invalid revision {revision!r}")
        return ModelSpec("hf", repo_id, revision or None)
    if scheme == "local":
        if not rest:
            raise InputError("local: needs a directory path under the model root")
        return ModelSpec("local", rest)
    raise InputError(f"unknown model source {scheme!r}: use hf:<repo_id>[@revision], local:<dir> or builtin:<name>")


# Every transformers `from_pretrained` on a user-supplied model reads a folder already on disk (a local
# source, or a Hub snapshot fetched by hub.py) and never runs code shipped with it.
LOAD_KWARGS = {"trust_remote_code": False, "local_files_only": True}


def directory_revision(path: Path) -> str:
    """Content hash of a local model's weight and config files: changes exactly when they do."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in {".safetensors", ".json"}:
            digest.update(str(file.relative_to(path)).encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def resolve_revision(spec: ModelSpec, model_root: Path | None, timeout: float = hub.DEFAULT_TIMEOUT,
                     hub_token: bool = False) -> str:
    """The model's current revision, without loading it: what the registry compares between firings."""
    if spec.kind == "builtin":
        return builtin_version(spec.id)
    if spec.kind == "local":
        return directory_revision(resolve_under_root(spec.id, model_root, what="model"))
    return hub.resolve(spec.id, spec.revision, timeout=timeout, token=hub_token)


def model_config(spec: ModelSpec, model_root: Path | None, cache_dir: Path, timeout: float = hub.DEFAULT_TIMEOUT
                 ) -> dict | None:
    """A Hub or local model's config.json, without loading the model; None for builtins."""
    import json

    if spec.kind == "builtin":
        return None
    if spec.kind == "local":
        path = resolve_under_root(spec.id, model_root, what="model") / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise InputError(f"{spec} has no readable config.json") from None
    return hub.config(spec.id, spec.revision, cache_dir, timeout)
