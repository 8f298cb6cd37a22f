"""Write a copy of the book's _config.yml for a build elsewhere: the tests' build and the student edition.

    python tools/book_config.py OUT_DIR [--student] [--no-execute]

writes OUT_DIR/_config.yml and prints its path. The copy makes the local extension paths absolute (a
configuration file outside the repository would resolve them from its own folder); ``--student`` hides
every ``{solution}`` block (sphinx-exercise's ``hide_solutions``) and renames the book; ``--no-execute``
builds from the notebooks' committed outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def book_config(*, student: bool = False, execute: bool = True) -> dict:
    """The book's configuration, adapted: absolute extension paths, and the two options above."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    sphinx = dict(config["sphinx"])
    sphinx["local_extensions"] = {name: str(ROOT / path) for name, path in sphinx.get("local_extensions", {}).items()}
    if student:
        sphinx["config"] = dict(sphinx.get("config", {}), hide_solutions=True)
        config["title"] = config.get("title", "") + " (student edition)"
    config["sphinx"] = sphinx
    if not execute:
        config["execute"] = dict(config["execute"], execute_notebooks="off")
    return config


def write_config(out_dir: str | Path, *, student: bool = False, execute: bool = True) -> Path:
    """Write :func:`book_config` to ``out_dir/_config.yml`` and return that path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "_config.yml"
    path.write_text(yaml.safe_dump(book_config(student=student, execute=execute)))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--student", action="store_true", help="hide the solutions")
    parser.add_argument("--no-execute", action="store_true", help="use the notebooks' committed outputs")
    args = parser.parse_args()
    print(write_config(args.out_dir, student=args.student, execute=not args.no_execute))
