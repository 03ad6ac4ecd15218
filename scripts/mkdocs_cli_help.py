"""mkdocs hook: the command line page shows each command's ``--help``, taken from
the parser itself, so it never disagrees with the program."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- zarrdali-cli-help -->"


def _help_sections() -> str:
    from zarrdali.cli import build_parser

    os.environ.setdefault("COLUMNS", "88")  # argparse wraps to the terminal's width
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = ["## zarrdali\n\n```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name, command in sub.choices.items():
        sections.append(f"## zarrdali {name}\n\n```text\n{command.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _help_sections())
