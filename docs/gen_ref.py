"""The configuration reference, generated at build time from the plugin's table of settings.

A mkdocs hook (``hooks:`` in mkdocs.yml): in ``configuration.md`` it replaces the line
``<!-- options-table -->`` with a table of every ``--rerobots-*`` option. Nothing in that
table is written by hand: each row is one entry of ``pytest_rerobots.settings.OPTIONS``
(the settings: their flag, metavar, environment variable, ini name, default and help)
or ``COMMAND_LINE_ONLY``, the table the plugin's options, ``--help``, the ``Settings``
and ``InstanceOptions`` defaults come from too. ``tests/test_docs_options.py`` checks
the generated table against what ``pytest --help`` says.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pytest_rerobots.settings import COMMAND_LINE_ONLY, OPTIONS, shown

MARKER = "<!-- options-table -->"
PAGE = "configuration.md"


class Row(NamedTuple):
    """One option as the reference shows it."""

    flag: str
    metavar: str | None  # None: a switch that takes no value
    repeatable: bool
    env: str | None
    ini: str | None
    default: str  # as shown; a dash when not a fixed value, "" when the option has none
    help: str


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "\u2013"  # an en dash: no fixed value: the description says what happens
    return f"`{shown(value)}`" if isinstance(value, str) else shown(value)


def rows() -> list[Row]:
    """Every ``--rerobots-*`` option, in the order ``--help`` lists them: the settings,
    then the options of the command line only (their default column left empty)."""
    return [
        Row(
            flag=opt.flag,
            metavar=opt.metavar,
            repeatable=opt.kind == "list",
            env=opt.env,
            ini=opt.ini,
            default=_shown(opt.default) if setting else "",
            # The plugin's --help adds the environment variable, which has a column here.
            help=opt.help,
        )
        for options, setting in ((OPTIONS, True), (COMMAND_LINE_ONLY, False))
        for opt in options
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    """The reference as a Markdown table."""
    lines = [
        "| option | environment | ini | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for row in rows():
        option = f"`{row.flag}`" if row.metavar is None else f"`{row.flag} {row.metavar}`"
        if row.repeatable:
            option += " (repeatable)"
        lines.append("| " + " | ".join(_cell(cell) for cell in (
            option,
            f"`{row.env}`" if row.env else "",
            f"`{row.ini}`" if row.ini else "",
            row.default,
            row.help,
        )) + " |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: put the generated table in the configuration page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} must hold the line {MARKER} where the options go")
    return markdown.replace(MARKER, table())
