"""docs/architecture.md names every module of src/trady (issue 15: the map stays true)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_named_in_the_architecture_document() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.py\b", doc)) | set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*/", doc))
    src = ROOT / "src" / "trady"
    missing = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.name in ("__init__.py", "__main__.py") and len(rel.parts) == 1:
            continue
        if rel.name == "__init__.py":
            if f"{rel.parts[-2]}/" not in named:
                missing.append(str(rel.parent) + "/")
        elif rel.name not in named:
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
