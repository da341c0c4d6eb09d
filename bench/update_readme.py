"""Copy each benchmark's markdown table (bench/results/<name>.md) into the documents that show
it, between the markers <!-- results:<name> --> and <!-- /results:<name> -->: every table in
docs/results.md, the front-door table in README.md.

    .venv/bin/python bench/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")


def main() -> None:
    tables = sorted((ROOT / "bench" / "results").glob("*.md"))
    for document in DOCUMENTS:
        text = document.read_text()
        for table in tables:
            name = table.stem
            pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
            if pattern.search(text):
                text = pattern.sub(lambda m: m.group(1) + table.read_text() + m.group(2), text)
                print(f"{document.relative_to(ROOT)}: updated {name}")
        document.write_text(text)


if __name__ == "__main__":
    main()
