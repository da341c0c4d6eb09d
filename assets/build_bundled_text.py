#!/usr/bin/env python3
"""Build the bundled, offline English Wikipedia text sample used by casp.

What it does
------------
casp needs a small amount of real English prose that is available without
network access (e.g. for calibration and perplexity smoke tests).  This script
produces it from a public, versioned source: the shortened English Wikipedia
dump that gensim ships as test data,

    gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2

inside the gensim 4.4.0 wheel (a bz2-compressed MediaWiki XML export with 206
pages, about half of which are redirects; revisions up to May 2016).

Steps:

1. Obtain the gensim 4.4.0 wheel, either from ``--gensim-wheel PATH`` or by
   running ``python -m pip download --no-deps gensim==4.4.0`` into a temporary
   directory, and read the dump out of the wheel with :mod:`zipfile` (the
   wheel is never installed by this step).
2. Parse the XML pages.  Only main-namespace articles (``<ns>0</ns>``) that are
   not redirects are kept; for each, the title and the wikitext of its latest
   revision are taken.
3. Strip the wiki markup with ``gensim.corpora.wikicorpus.filter_wiki``.
   A few constructs that filter_wiki handles badly are removed first: image
   embeds (``[[File:...]]``/``[[Image:...]]``, captions included, since filter_wiki
   truncates captions that contain links and leaks ``thumb``/``alt=``
   options), ``<gallery>`` blocks, and ``{| ... |}`` tables (which it turns
   into one short cell fragment per line); ``<br>`` becomes a space and
   ``__TOC__``-style magic words are dropped.  Afterwards the text is tidied:
   whitespace is normalised (runs of spaces, including no-break spaces,
   become one space; invisible format characters are removed),
   ``== Heading ==`` lines become plain heading lines, bold/italic quote
   marks, list markers and parentheses emptied by template removal (as in
   "Alabama () is") are removed, lines that are empty or contain no
   letter or digit are dropped, back-matter sections ("References",
   "External links", "See also", ...) are dropped, and so are headings
   whose section ends up empty.
4. Write UTF-8 text, one block per article: the title on the first line, then
   one paragraph per line; articles are separated by exactly one blank line
   and appear in dump order.  The file ends with a single newline.
5. Compress with :mod:`lzma` (xz container, preset 9, CRC64) to
   ``casp/data/bundled/enwiki_sample.txt.xz`` (directories are created).

The output is byte-for-byte deterministic: the input is a fixed file inside a
pinned wheel (its SHA-256 is checked), the processing has no randomness or
timestamps, and the xz container written by :mod:`lzma` carries no
modification time or file name.

Requirements
------------
Python 3.11 and gensim (for ``filter_wiki``).  gensim is a build-time
dependency only -- it is *not* a dependency of casp -- so install it into a
separate environment, e.g.::

    python3 -m venv /tmp/gensimenv
    /tmp/gensimenv/bin/pip install gensim==4.4.0

How to run
----------
From the repository root::

    /tmp/gensimenv/bin/python assets/build_bundled_text.py
    # or, with a wheel that has already been downloaded:
    /tmp/gensimenv/bin/python assets/build_bundled_text.py \\
        --gensim-wheel /path/to/gensim-4.4.0-...whl

The script prints the number of articles, the number of characters of the
uncompressed text and the size of the compressed file.  The licence and the
list of articles are recorded in ``casp/data/bundled/ATTRIBUTION.md``.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import lzma
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

GENSIM_VERSION = "4.4.0"
DUMP_MEMBER = (
    "gensim/test/test_data/"
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
# SHA-256 of DUMP_MEMBER (the .bz2 bytes) in the gensim 4.4.0 wheels.
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "casp" / "data" / "bundled" / "enwiki_sample.txt.xz"


# --------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------


def download_wheel(dest: Path) -> Path:
    """Download the gensim wheel (no dependencies) into ``dest`` with pip."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"gensim=={GENSIM_VERSION}",
        "-d",
        str(dest),
    ]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(
            f"error: pip did not produce a gensim {GENSIM_VERSION} wheel in {dest}; "
            "download one by hand and pass it with --gensim-wheel"
        )
    return wheels[0]


def read_dump(wheel: Path, verify: bool = True) -> bytes:
    """Return the decompressed XML dump stored in ``wheel``."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(DUMP_MEMBER)
        except KeyError:
            raise SystemExit(f"error: {wheel} does not contain {DUMP_MEMBER}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if verify and digest != DUMP_SHA256:
        raise SystemExit(
            f"error: SHA-256 of {DUMP_MEMBER} is {digest}, expected {DUMP_SHA256}; "
            "the output would not be reproducible (use --no-verify to build anyway)"
        )
    return bz2.decompress(raw)


# --------------------------------------------------------------------------
# XML parsing
# --------------------------------------------------------------------------


@dataclass
class Page:
    title: str
    wikitext: str


def _local(tag: str) -> str:
    """Tag name without its ``{namespace}`` prefix."""
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for sub in elem:
        if _local(sub.tag) == name:
            return sub
    return None


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [sub for sub in elem if _local(sub.tag) == name]


def iter_articles(xml_bytes: bytes):
    """Yield :class:`Page` for every non-redirect main-namespace page, in order."""
    for _event, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if _local(elem.tag) != "page":
            continue
        title_el = _child(elem, "title")
        ns_el = _child(elem, "ns")
        title = (title_el.text or "").strip() if title_el is not None else ""
        ns = (ns_el.text or "").strip() if ns_el is not None else ""
        is_redirect = _child(elem, "redirect") is not None
        revisions = _children(elem, "revision")
        if ns == "0" and not is_redirect and title and revisions:
            # Latest revision: greatest timestamp (ISO 8601, so string order is
            # time order); ties are resolved by document order (last wins).
            def stamp(rev: ET.Element) -> str:
                ts = _child(rev, "timestamp")
                return (ts.text or "") if ts is not None else ""

            latest = max(enumerate(revisions), key=lambda ir: (stamp(ir[1]), ir[0]))[1]
            text_el = _child(latest, "text")
            text = (text_el.text or "") if text_el is not None else ""
            # Belt and braces: some dumps mark redirects only in the text.
            if not re.match(r"\s*#redirect", text, re.IGNORECASE):
                yield Page(title=title, wikitext=text)
        elem.clear()


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------


def import_filter_wiki():
    try:
        from gensim.corpora.wikicorpus import filter_wiki
    except ImportError as exc:
        raise SystemExit(
            "error: gensim is required to build the bundled text but could not be "
            f"imported ({exc}).\n"
            "Install it into a separate environment (not casp's own), e.g.\n"
            "    python3 -m venv /tmp/gensimenv\n"
            f"    /tmp/gensimenv/bin/pip install gensim=={GENSIM_VERSION}\n"
            "and run this script with /tmp/gensimenv/bin/python."
        ) from None
    return filter_wiki


# Horizontal whitespace, including no-break and other Unicode spaces.
_RE_SPACES = re.compile(r"[^\S\n]+")
# Invisible format characters (soft hyphen, zero-width space/joiners, marks).
_RE_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060\ufeff]")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_RE_BOLD_ITALIC = re.compile(r"'{2,}")
_RE_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
# Punctuation stranded at the start of a line by a removed template, e.g.
# "{{lang|ar|...}}: This reading ..." -> ": This reading ...".
_RE_LEADING_PUNCT = re.compile(r"^[:;,.]+\s+")
# Parentheses emptied by removed templates (pronunciations, native-script
# names): "Aristotle (; , Aristotélēs; 384–322 BC)" -> "Aristotle
# (Aristotélēs; 384–322 BC)", "Alabama () is" -> "Alabama is".
_RE_PAREN_LEAD = re.compile(r"\(\s*(?:[,;:]\s*)+")
_RE_PAREN_TRAIL = re.compile(r"(?:\s*[,;:])+\s*\)")
# (only a free-standing "()", so that literal text such as "&'()" survives)
_RE_PAREN_EMPTY = re.compile(r"\s+\(\s*\)(?=[\s,.;:]|$)")
# Sections that are bibliographic / navigational rather than prose.  After
# markup stripping they are bare lists of citations, links and titles, so
# drop_empty_sections removes them (with their subsections).
_BACK_MATTER = {
    "see also",
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
    "notes and references",
}


@dataclass
class Line:
    text: str
    level: int = 0  # heading level (number of '='), 0 for body text


def clean_lines(raw: str) -> list[Line]:
    """Turn filter_wiki output into a list of non-empty cleaned lines."""
    out: list[Line] = []
    for line in raw.split("\n"):
        line = _RE_INVISIBLE.sub("", line)
        line = _RE_SPACES.sub(" ", line).strip()
        if not line:
            continue
        heading = _RE_HEADING.match(line)
        level = 0
        if heading:
            level = len(heading.group(1))
            line = heading.group(2)
        line = _RE_BOLD_ITALIC.sub("", line)
        if not level:
            line = _RE_LIST_MARKER.sub("", line)
            line = _RE_LEADING_PUNCT.sub("", line)
        line = _RE_PAREN_LEAD.sub("(", line)
        line = _RE_PAREN_TRAIL.sub(")", line)
        line = _RE_PAREN_EMPTY.sub("", line)
        line = _RE_SPACES.sub(" ", line).strip()
        if not any(ch.isalnum() for ch in line):
            continue
        out.append(Line(line, level))
    return out


def drop_empty_sections(lines: list[Line]) -> list[Line]:
    """Remove back-matter sections and headings left without body text.

    A heading is kept only if some body line follows before the next heading
    of the same or a higher level.  Back-matter sections ("References",
    "External links", ...) are removed entirely: after markup stripping they
    hold bare citation fragments, not prose.
    """
    # First remove back-matter sections wholesale (with their subsections).
    kept: list[Line] = []
    skip_level = 0
    for ln in lines:
        if skip_level:
            if ln.level and ln.level <= skip_level:
                skip_level = 0
            else:
                continue
        if ln.level and ln.text.casefold().strip(" :") in _BACK_MATTER:
            skip_level = ln.level
            continue
        kept.append(ln)

    # Then remove headings whose section (incl. subsections) has no body text.
    result: list[Line] = []
    for i, ln in enumerate(kept):
        if ln.level:
            has_body = False
            for nxt in kept[i + 1 :]:
                if nxt.level and nxt.level <= ln.level:
                    break
                if not nxt.level:
                    has_body = True
                    break
            if not has_body:
                continue
        result.append(ln)
    return result


_RE_GALLERY = re.compile(r"<gallery\b.*?</gallery\s*>", re.IGNORECASE | re.DOTALL)
_RE_FILE_LINK_START = re.compile(r"\[\[\s*(?:file|image)\s*:", re.IGNORECASE)
_RE_BR = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_RE_MAGIC_WORD = re.compile(r"__[A-Z]+__")


def remove_file_links(text: str) -> str:
    """Remove ``[[File:...]]`` / ``[[Image:...]]`` embeds, captions included.

    filter_wiki keeps the caption of an image, but its regular expression stops
    at the first ``]]``, so captions that contain links come out truncated and
    mixed with image options (``alt=...``, ``thumb``).  Image captions are not
    article prose anyway, so the whole embed is dropped, honouring nested
    ``[[...]]`` inside it.  An embed that is never closed is left in place.
    """
    out: list[str] = []
    pos = 0
    while True:
        m = _RE_FILE_LINK_START.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos : m.start()])
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1
                i += 2
            elif text.startswith("]]", i):
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        if depth != 0:
            # Unclosed embed: keep the text rather than drop the rest of the
            # article, and carry on searching after its opening brackets.
            out.append(text[m.start() : m.end()])
            pos = m.end()
        else:
            pos = i


def remove_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (nested ones included), line by line.

    filter_wiki turns table cells into one short fragment per line (years,
    names, numbers), which is noise rather than prose.  A table whose closing
    ``|}`` is missing is left alone so that it cannot swallow the rest of
    the article.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("{|"):
            out.append(lines[i])
            i += 1
            continue
        depth, j = 0, i
        while j < len(lines):
            stripped = lines[j].lstrip()
            if stripped.startswith("{|"):
                depth += 1
            elif stripped.startswith("|}"):
                depth -= 1
            j += 1
            if depth == 0:
                break
        if depth == 0:
            i = j  # skip the whole table
        else:
            out.append(lines[i])  # unbalanced: keep, let filter_wiki cope
            i += 1
    return "\n".join(out)


def pre_clean(wikitext: str) -> str:
    """Markup that filter_wiki handles badly, removed before calling it."""
    text = wikitext.replace("\r\n", "\n").replace("\r", "\n")
    text = _RE_GALLERY.sub("", text)
    text = remove_file_links(text)
    text = remove_tables(text)
    text = _RE_BR.sub(" ", text)
    text = _RE_MAGIC_WORD.sub("", text)
    return unicodedata.normalize("NFC", text)


def clean_article(wikitext: str, filter_wiki) -> str:
    """Return the cleaned body of one article: paragraphs joined by '\\n'."""
    stripped = filter_wiki(pre_clean(wikitext))
    lines = drop_empty_sections(clean_lines(stripped))
    return "\n".join(ln.text for ln in lines)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def build_text(xml_bytes: bytes) -> tuple[str, list[str]]:
    filter_wiki = import_filter_wiki()
    blocks: list[str] = []
    titles: list[str] = []
    for page in iter_articles(xml_bytes):
        body = clean_article(page.wikitext, filter_wiki)
        if not body:
            print(f"skipping {page.title!r}: no text left after cleaning", file=sys.stderr)
            continue
        title = _RE_SPACES.sub(" ", page.title).strip()
        blocks.append(f"{title}\n{body}")
        titles.append(title)
    return "\n\n".join(blocks) + "\n", titles


def write_xz(text: str, output: Path) -> int:
    data = lzma.compress(
        text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, output)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gensim-wheel",
        type=Path,
        help=f"path to a gensim {GENSIM_VERSION} wheel (default: download one with pip)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"output .xz file (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the SHA-256 of the dump inside the wheel",
    )
    parser.add_argument(
        "--titles",
        action="store_true",
        help="also print the titles of the included articles",
    )
    args = parser.parse_args(argv)

    # Fail early, before any download, if gensim is missing.
    import_filter_wiki()

    if args.gensim_wheel is not None:
        xml_bytes = read_dump(args.gensim_wheel, verify=not args.no_verify)
    else:
        with tempfile.TemporaryDirectory(prefix="gensim-wheel-") as tmp:
            wheel = download_wheel(Path(tmp))
            xml_bytes = read_dump(wheel, verify=not args.no_verify)

    text, titles = build_text(xml_bytes)
    size = write_xz(text, args.output)

    print(f"articles:        {len(titles)}")
    print(f"characters:      {len(text)}")
    print(f"utf-8 bytes:     {len(text.encode('utf-8'))}")
    print(f"compressed size: {size} bytes ({args.output})")
    if args.titles:
        for title in titles:
            print(f"  {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
