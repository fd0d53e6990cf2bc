"""Write the generated parts of the documentation from the registry: ``docs/reference.md`` and the support matrix
of ``README.md`` (between its ``support-matrix`` markers). ``make docs`` runs it; ``tests/test_docs.py`` fails
when the committed files differ from what it generates.

    python docs/generate.py [--check]
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parent.parent
MATRIX = re.compile(r"(<!-- support-matrix:start[^>]*-->\n)(.*?)(<!-- support-matrix:end -->)", re.S)


def render() -> Dict[Path, str]:
    """path -> the content it should have."""
    sys.path.insert(0, str(ROOT))
    from fluence_fairseq.cli.help import reference_markdown, support_matrix

    readme = ROOT / "README.md"
    text = readme.read_text()
    if not MATRIX.search(text):
        raise SystemExit(f"{readme} has no support-matrix markers")
    text = MATRIX.sub(lambda m: m.group(1) + support_matrix() + "\n" + m.group(3), text)
    return {ROOT / "docs" / "reference.md": reference_markdown(), readme: text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for path, content in render().items():
        if not path.exists() or path.read_text() != content:
            stale.append(path)
            if not args.check:
                path.write_text(content)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
