"""What each role's image installs: packages and installed size, from the metadata of an environment
that holds every role (the dev venv) — no install needed.

For each extra of pyproject.toml (plus the base dependencies) the closure of its requirements is
walked through `importlib.metadata`, and each distribution's installed size is summed from its
RECORD. `--before` prints the same for one set of requirement names (e.g. the old single
requirements.txt that every image installed).

    python -m bench.role_footprint [--before torch numpy ...]
"""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s;=<>!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(names: list[str]) -> set[str]:
    """Every distribution `names` need at run time (extras of dependencies not followed)."""
    seen: set[str] = set()
    todo = [_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(_name(req))
    return seen


def installed_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def report(label: str, names: list[str]) -> None:
    dists = closure(names)
    size = sum(installed_bytes(d) for d in dists)
    heavy = sorted(dists & {"torch", "opencv-python-headless", "dlib-bin", "numba", "av", "scipy", "sentencepiece",
                            "flower"})
    print(f"| {label} | {len(dists)} | {size / 2**20:,.0f} MiB | {', '.join(heavy) or '—'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", nargs="*", help="requirement names installed by every image before")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    print("| role | distributions | installed | heavy ones |")
    print("|---|---|---|---|")
    if args.before:
        report("before: every image", args.before)
    for role in ("api", "cpu", "gpu", "flower"):
        report(role, base + project["optional-dependencies"][role])


if __name__ == "__main__":
    main()
