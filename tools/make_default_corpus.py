#!/usr/bin/env python3
"""Regenerate the embedded default corpus ``data/corpus/kjv.jsonl.gz``.

Development-time tool: the corpus is committed, so nobody needs to run this to
train.  It exists so that the shipped file can be audited and rebuilt.

Source: the King James Version (Authorized Version, 1611; text as in the
Debian package ``bible-kjv-text`` 4.38, read with the ``bible`` program from
the Debian package ``bible-kjv`` 4.38).  See ``data/README.md`` for licensing.

What it does:

1. Unless ``--bible-root`` points at an already extracted tree, downloads the
   two .deb files with ``apt-get download`` (Debian/Ubuntu only; run
   ``apt-get update`` first) into a temporary directory and extracts them with
   ``dpkg-deb -x`` (nothing is installed on the system).
2. Dumps Genesis 1:1 to Revelation 22:21 with ``bible -l 100000`` (one verse
   per line, a "Book Chapter" heading before each chapter).
3. Checks the structure (66 books, 1189 chapters, 31102 verses) and writes one
   JSON document per chapter::

       {"id": "kjv/Genesis/1", "text": "Genesis 1\\n\\nIn the beginning ...\\nAnd the earth ..."}

   The heading line is kept, verse numbers are dropped, each verse is a line.
4. Writes the gzip file deterministically (mtime 0, no file name in the
   header) so that a rebuild from the same package is byte-identical.

Usage::

    python tools/make_default_corpus.py [--bible-root DIR] [--output data/corpus/kjv.jsonl.gz]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "data", "corpus", "kjv.jsonl.gz")
PACKAGES = ("bible-kjv", "bible-kjv-text")
EXPECTED = {"books": 66, "chapters": 1189, "verses": 31102}

_HEADING = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (\S.*)$")


def fetch_packages(workdir: str) -> str:
    """apt-get download the two packages into workdir, extract them, return the root."""
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=workdir, check=True)
    root = os.path.join(workdir, "root")
    os.makedirs(root)
    for name in sorted(os.listdir(workdir)):
        if name.endswith(".deb"):
            subprocess.run(["dpkg-deb", "-x", os.path.join(workdir, name), root], check=True)
    return root


def dump_bible(root: str) -> str:
    exe = os.path.join(root, "usr", "bin", "bible")
    data_dir = os.path.join(root, "usr", "lib")
    out = subprocess.run(
        [exe, "-p", data_dir, "-l", "100000", "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    return out.stdout.decode("ascii")


def parse_chapters(dump: str) -> list[dict]:
    """Parse the pretty-printed dump into [{"book", "chapter", "verses": [...]}]."""
    chapters: list[dict] = []
    for lineno, line in enumerate(dump.splitlines(), 1):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m:
            if not chapters:
                raise ValueError(f"line {lineno}: verse before any chapter heading")
            verses = chapters[-1]["verses"]
            if int(m.group(1)) != len(verses) + 1:
                raise ValueError(f"line {lineno}: verse {m.group(1)} out of order")
            verses.append(m.group(2).strip())
            continue
        m = _HEADING.match(line)
        if not m:
            raise ValueError(f"line {lineno}: unrecognised line {line!r}")
        chapters.append({"book": m.group(1), "chapter": int(m.group(2)), "verses": []})
    books = {c["book"] for c in chapters}
    got = {
        "books": len(books),
        "chapters": len(chapters),
        "verses": sum(len(c["verses"]) for c in chapters),
    }
    if got != EXPECTED:
        raise ValueError(f"unexpected structure {got}, expected {EXPECTED}")
    return chapters


def to_documents(chapters: list[dict]) -> list[dict]:
    docs = []
    for c in chapters:
        heading = f"{c['book']} {c['chapter']}"
        text = heading + "\n\n" + "\n".join(c["verses"])
        docs.append({"id": f"kjv/{c['book']}/{c['chapter']}", "text": text})
    return docs


def write_jsonl_gz(docs: list[dict], path: str) -> bytes:
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--bible-root",
        help="directory where bible-kjv and bible-kjv-text are "
        "extracted (contains usr/bin/bible and usr/lib/bible.data); default: "
        "apt-get download them into a temporary directory",
    )
    ap.add_argument("--output", default=DEFAULT_OUTPUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.bible_root or fetch_packages(tmp)
        chapters = parse_chapters(dump_bible(root))
    docs = to_documents(chapters)
    raw = write_jsonl_gz(docs, args.output)
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    print(
        f"wrote {args.output}: {len(docs)} documents, {text_bytes} bytes of text, "
        f"{len(raw)} bytes of jsonl, {os.path.getsize(args.output)} bytes compressed, "
        f"sha256(jsonl)={hashlib.sha256(raw).hexdigest()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
