"""The README's and method.md's figures, regenerated from the committed benchmark results: every block between
`<!-- results:NAME -->` and `<!-- /results:NAME -->` is the content of `bench/results/NAME` (a table a
benchmark wrote, or the worked example's output in a code block), never a hand-copied figure.

    .venv/bin/python bench/readme.py           # rewrite the blocks
    .venv/bin/python bench/readme.py --check   # exit 1 if any block differs from its results file
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "method.md")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def rendered(name: str) -> str:
    text = (RESULTS / name).read_text()
    return f"```\n{text.rstrip()}\n```\n" if name.endswith(".txt") else text


def refresh(text: str) -> tuple[str, list[str]]:
    """The document with every block replaced by its results file, and the names of the blocks that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        body = rendered(match["name"])
        if body != match["body"]:
            changed.append(match["name"])
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def main() -> int:
    arguments = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_argument("--check", action="store_true")
    args = arguments.parse_args()
    stale = []
    for document in DOCUMENTS:
        text, changed = refresh(document.read_text())
        stale += [f"{document.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            document.write_text(text)
    if args.check and stale:
        print("out of date with bench/results: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
