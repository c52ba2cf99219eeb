"""Shared by the bench scripts: put a generated table into a markdown file between markers."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(doc: Path, marker: str, text: str) -> None:
    """Replace what lies between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in ``doc``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = doc.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{doc} has no '{start}' ... '{end}' markers")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))
