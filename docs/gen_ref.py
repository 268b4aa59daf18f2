"""The configuration reference, generated at build time from the plugin's own option table.

A mkdocs hook (``hooks:`` in mkdocs.yml): in ``configuration.md`` it replaces the line
``<!-- options-table -->`` with a table of every ``--rerobots-*`` option. Nothing in that
table is written by hand. The options, their help and their ini names come from the plugin's
``pytest_addoption`` (found through the ``pytest11`` entry point, so it follows the plugin
wherever it lives), the environment variables from ``settings.OPTIONS``, the defaults from
the ``Settings`` dataclass. ``tests/test_docs_options.py`` checks the table against
``pytest --help``.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import Any, NamedTuple

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


class _Recorder:
    """Stands in for pytest's parser and its option group: records what the plugin adds."""

    def __init__(self) -> None:
        self.options: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.ini: dict[str, dict[str, Any]] = {}

    def getgroup(self, name: str, description: str = "", after: str | None = None) -> _Recorder:
        return self

    def addoption(self, *names: str, **attrs: Any) -> None:
        self.options.append((names, attrs))

    def addini(self, name: str, help: str, type: str | None = None, default: Any = None,
               **kwargs: Any) -> None:
        self.ini[name] = {"help": help, "type": type}


def _plugin() -> Any:
    (entry,) = [ep for ep in entry_points(group="pytest11") if ep.name == "rerobots"]
    return entry.load()


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "\u2013"  # an en dash: no fixed value: the description says what happens
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def rows() -> list[Row]:
    """Every ``--rerobots-*`` option the plugin registers, in its order."""
    settings = importlib.import_module("pytest_rerobots.settings")
    by_flag = {opt.flag: opt for opt in settings.OPTIONS}
    defaults = {f.name: f.default for f in dataclasses.fields(settings.Settings)
                if f.default is not dataclasses.MISSING}
    recorder = _Recorder()
    _plugin().pytest_addoption(recorder)
    out = []
    for names, attrs in recorder.options:
        (flag,) = [n for n in names if n.startswith("--rerobots-")]
        opt = by_flag.get(flag)
        takes_value = attrs.get("action") not in ("store_true", "store_false")
        ini = opt.ini if opt and opt.ini in recorder.ini else None
        out.append(Row(
            flag=flag,
            metavar=attrs.get("metavar", flag[2:].upper()) if takes_value else None,
            repeatable=attrs.get("action") == "append",
            env=opt.env if opt else None,
            ini=ini,
            default=_shown(defaults.get(opt.name)) if opt else "",
            # The settings table's help: the plugin's --help adds the env name, which
            # has a column of its own here.
            help=opt.help if opt else attrs.get("help", ""),
        ))
    return out


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
