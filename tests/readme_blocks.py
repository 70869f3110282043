"""The fenced code blocks of README.md and the docs pages: find them, and run the ```python ones.

    python tests/readme_blocks.py README.md docs/guides/steering.md ... --report out.json [--line N]

Rule: every ```python block runs alone, in a fresh namespace, as a reader who copies it
into a file would run it; no block depends on another. The runner executes them one
after another in this one process (so jax is imported once) in the current directory,
and writes ``[{"line", "heading", "seconds", "cpu_seconds", "error"}]`` to ``--report``. tests/test_readme.py
runs it in a temporary directory and checks the ```bash blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import traceback
from pathlib import Path

FENCE = re.compile(r"^```\s*(\S*)")  # the language, or a MyST directive such as {toctree}


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    lang: str  # "python", "bash", "" for a plain fence
    code: str
    line: int  # 1-based line of the first code line
    heading: str  # the nearest heading above it
    source: str = "README.md"  # the markdown file, as the report names it

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} ({self.heading})"


def code_blocks(text: str, source: str = "README.md") -> list[CodeBlock]:
    """Every fenced block of a markdown text, in order. An unclosed fence raises ValueError."""
    blocks, heading, lang, start, body = [], "(top)", None, 0, []
    for i, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if lang is None:
            if fence:
                lang, start, body = fence.group(1), i + 1, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            blocks.append(CodeBlock(lang, "\n".join(body) + "\n", start, heading, source))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        raise ValueError(f"{source}:{start - 1}: a ```{lang} fence is never closed")
    return blocks


def run_block(block: CodeBlock) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    error = None
    try:
        exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
    except BaseException:  # SystemExit too: a block must run to its end
        error = traceback.format_exc(limit=-8)
    return {
        "file": block.source,
        "line": block.line,
        "heading": block.heading,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,  # all threads: a load-independent measure of the cost
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("markdown", nargs="+", help="README.md and / or docs pages")
    p.add_argument("--report", required=True, help="JSON file for the per-block results")
    p.add_argument("--line", type=int, default=None, help="run only the block starting at this line (of each file)")
    args = p.parse_args(argv)
    blocks = [b for path in args.markdown for b in code_blocks(Path(path).read_text(), path) if b.lang == "python"]
    if args.line is not None:
        blocks = [b for b in blocks if b.line == args.line]
    results = []
    for block in blocks:
        print(f"--- {block.where}", flush=True)
        results.append(run_block(block))
        Path(args.report).write_text(json.dumps(results, indent=1))  # kept even if a later block hangs
    Path(args.report).write_text(json.dumps(results, indent=1))
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
