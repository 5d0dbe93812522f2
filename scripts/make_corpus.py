"""Write real English text available offline: the docstrings of the installed Python standard library.

Usage: python scripts/make_corpus.py OUT_DIR

Source files are parsed with ``ast`` (nothing is imported), and every module, class and function
docstring of at least MIN_CHARS characters becomes one document of a ``.jsonl`` file (key ``text``).
Test suites and vendored third-party code are skipped.
"""

import ast
import json
import sys
import sysconfig
from pathlib import Path

MIN_CHARS = 200
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    texts = (ast.get_docstring(node, clean=True) for node in nodes)
    return [text for text in texts if text and len(text) >= MIN_CHARS]


def main(out_dir: str) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = chars = 0
    with (out / "stdlib-docstrings.jsonl").open("w", encoding="utf-8") as handle:
        for path in sorted(stdlib.rglob("*.py")):
            if SKIPPED_PARTS & set(path.relative_to(stdlib).parts):
                continue
            for text in docstrings(path):
                handle.write(json.dumps({"text": text, "source": str(path.relative_to(stdlib))}) + "\n")
                count += 1
                chars += len(text)
    print(f"wrote {count} docstrings ({chars / 1e6:.1f} M characters) to {out / 'stdlib-docstrings.jsonl'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_corpus.py OUT_DIR")
    main(sys.argv[1])
