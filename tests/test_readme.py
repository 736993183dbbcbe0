"""The README's Python examples run as written (with NumPy pools), from one import line."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_manager_example_runs_with_one_import_line() -> None:
    blocks = [b for b in python_blocks() if "KVCacheManager(" in b]
    assert len(blocks) == 1
    code = blocks[0]
    imports = [line for line in code.splitlines() if line.startswith(("from ", "import "))]
    assert imports == [imports[0]] and imports[0].startswith("from hybridkv import ")
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    m = scope["m"]
    assert m.rows.n == 0 and not m.suspended  # type: ignore[attr-defined]
