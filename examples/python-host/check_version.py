"""The Python package is versioned with the authz-outbox binary.

Cargo.toml's ``[package] version`` is the one source: pyproject.toml's
``[project] version`` must equal it, and so must every version the docs
name for authz-outbox (an image tag, a `migrate --print-sql` file name).
Exits 1, naming each difference, when they differ (run-tests.sh runs it
first, so CI fails).

``--pythons`` prints the oldest and newest Python the package claims
(``requires-python`` and the highest ``Programming Language :: Python ::
3.X`` classifier), for run-tests.sh to test on.

Standard library only (Python >= 3.11).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Versions of authz-outbox the docs name: `authz-outbox:0.1.0` (an image),
# `authz_outbox_0_1_0.sql`, `authz-outbox 0.1.0`, `authz-outbox-host==0.1.0`.
DOC_VERSION = re.compile(r"authz[-_]outbox(?:-host)?(?:==|[ :_])v?(\d+)[._](\d+)[._](\d+)\b")
DOCS = ("README.md", "docs/*.md")


def binary_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def package() -> dict:
    return tomllib.loads((HERE / "pyproject.toml").read_text())["project"]


def mismatches() -> list[str]:
    expected = binary_version()
    found = []
    if package()["version"] != expected:
        found.append(
            f"examples/python-host/pyproject.toml: version {package()['version']!r}, "
            f"but Cargo.toml's [package] version is {expected!r}"
        )
    for pattern in DOCS:
        for doc in sorted(REPO.glob(pattern)):
            for n, line in enumerate(doc.read_text().splitlines(), 1):
                for m in DOC_VERSION.finditer(line):
                    named = ".".join(m.groups())
                    if named != expected:
                        found.append(
                            f"{doc.relative_to(REPO)}:{n}: names authz-outbox {named} "
                            f"({m.group(0)!r}), but Cargo.toml's version is {expected}"
                        )
    return found


def pythons() -> tuple[str, str]:
    project = package()
    oldest = re.fullmatch(r">=\s*(3\.\d+)", project["requires-python"])
    if oldest is None:
        sys.exit(f"requires-python {project['requires-python']!r} is not '>=3.X'")
    claimed = [
        c.rsplit("::", 1)[1].strip()
        for c in project.get("classifiers", [])
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    newest = max([oldest.group(1), *claimed], key=lambda v: int(v.split(".")[1]))
    return oldest.group(1), newest


def main() -> int:
    if sys.argv[1:] == ["--pythons"]:
        print(*pythons())
        return 0
    found = mismatches()
    for line in found:
        print(f"version mismatch: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
