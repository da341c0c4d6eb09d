"""Copy each benchmark's markdown table (bench/results/<name>.md) into README.md, between
the markers <!-- results:<name> --> and <!-- /results:<name> -->.

    .venv/bin/python bench/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for table in sorted((ROOT / "bench" / "results").glob("*.md")):
        name = table.stem
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + table.read_text() + m.group(2), text)
            print(f"README.md: updated {name}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
