"""Confining user-supplied names: paths to the operator's allowed root, Hub IDs to the Hub's naming rules."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

# Hub naming rules: [namespace/]name from letters, digits, '-', '_', '.', never '..' or a leading '.'/'-'.
# The patterns are also the API schema's (JSON Schema has no lookahead, so '..' is refused separately).
HF_REPO_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?"
HF_REVISION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_./-]{0,99}"
HF_CONFIG_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
# A dataset split is a name: no `train+test` or `train[:90%]`, which would escape the sample limits.
SPLIT_PATTERN = r"[A-Za-z0-9_]{1,64}"
HF_REPO_ID = re.compile(r"(?!.*\.\.)" + HF_REPO_PATTERN)
HF_REVISION = re.compile(r"(?!.*\.\.)" + HF_REVISION_PATTERN)
HF_CONFIG = re.compile(HF_CONFIG_PATTERN)
SPLIT_NAME = re.compile(SPLIT_PATTERN)


def resolve_under_root(value: str, root: Path | None, what: str) -> Path:
    """Resolve `value` (relative to `root`, or absolute) and refuse anything that lands outside `root`.

    Symlinks are resolved first, so a link pointing out of the root is refused too.
    """
    if root is None:
        raise InputError(f"local {what} paths are disabled: set MIXQ_MODEL_ROOT to the folder they may come from")
    if "\x00" in value:
        raise InputError(f"invalid {what} path")
    base = Path(root).resolve()
    candidate = Path(value)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    # One answer for "outside" and "missing", naming only what was given: the message must reveal neither where
    # the root is on the server nor which paths exist there.
    if not resolved.is_relative_to(base) or not resolved.exists():
        raise InputError(f"{what} path {value!r} names nothing under the allowed root (MIXQ_MODEL_ROOT)")
    return resolved
