"""Text from a robot or from the API, made safe to echo: to a terminal, into a
Markdown step summary, into the log of a GitHub Actions job.

A robot's output and the API's strings (regions, type names, statuses, error
messages) are not ours: a terminal acts on the escape sequences in them (an OSC
that retitles the window or plants a link, a CSI that clears the screen or moves
the cursor over earlier lines), Markdown renders their images and links, and the
Actions runner acts on the workflow commands in them (``::add-mask::``,
``::error::``, the legacy ``##[command]`` anywhere in a line). Everything here
keeps the text readable (it shows what was sent) and makes it inert:

- :func:`one_line` and :func:`block` replace control characters with a visible
  escape in Python's notation: ESC becomes the four characters ``\\x1b``, CR
  ``\\r``, a C1 control ``\\x9b``, a bidirectional override ``\\u202e``. A block
  keeps its tabs and line breaks; a single line (a table cell) keeps nothing.
- :func:`md_cell` and :func:`md_code` make a table cell or a code span of
  GitHub-flavoured Markdown show the text as text.
- :func:`fence_block`, :func:`fence_prefixed` and :func:`commands_stopped` put
  text between ``stop-commands`` markers with a fresh random token, under
  GitHub Actions only.

Pure functions, no imports beyond the standard library.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["block", "block_lines", "commands_stopped", "fence_block", "fence_prefixed",
           "in_github_actions", "md_cell", "md_code", "mermaid_text", "one_line"]

# Bidirectional embeddings, overrides and isolates: invisible, and they reorder what a
# terminal or a browser shows after them (text that reads other than it is).
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# C0 controls, DEL, C1 controls (a terminal may take U+009B as CSI), and the above. Kept
# as patterns, compiled (and cached by re) at their first use: every pytest run imports
# this module, and one that rents nothing never uses them.
_CONTROL = f"[\\x00-\\x1f\\x7f-\\x9f{_BIDI}]"
_CONTROL_BUT_TAB = f"[\\x00-\\x08\\x0a-\\x1f\\x7f-\\x9f{_BIDI}]"
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_LINE_BREAK = r"\r\n|\r|\n"


def _visible(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``text`` on one line with no control character: each one (tabs and line breaks
    too) shown as its escape, ``\\x1b``, ``\\n``, ``\\t``. For table cells and the
    lines of a listing, whose layout a tab or a line break would break."""
    return re.sub(_CONTROL, _visible, text)


def block_lines(text: str) -> list[str]:
    """The lines of ``text`` (broken at LF, CRLF and a lone CR, as ``str.splitlines``
    breaks them, but at nothing else), each with its control characters but tabs
    shown as escapes. A lone CR is a line break, not a return to the start of the line
    that lets what follows hide what came before; a line break at the end ends the
    last line and adds none."""
    parts = re.split(_LINE_BREAK, text)
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if parts == [""]:
        return []
    return [re.sub(_CONTROL_BUT_TAB, _visible, part) for part in parts]


def block(text: str) -> str:
    """Multi-line ``text`` as :func:`block_lines` shows it, lines joined by ``\\n``.
    Ordinary output (UTF-8 text, tabs, LF or CRLF line ends) comes out as it went in,
    CRLF as LF."""
    out = "\n".join(block_lines(text))
    return out + "\n" if out and text.endswith(("\n", "\r")) else out


# A table cell's content is parsed as inline Markdown only (no lists, headings, quotes),
# so these are the characters that can mean something there: backslash escapes, code
# spans, emphasis, strikethrough, links and images, the table's pipe, GitHub's math ($),
# emoji shortcodes (:), mentions (@) and issue references (#). Backslash-escaped, each is
# a literal (CommonMark lets every ASCII punctuation character be escaped); the others
# (- . / = and the like) stay as they are, so that ids and numbers read as they are.
# ``<``, ``>`` and ``&`` become character references, so no HTML tag or entity forms.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_PUNCTUATION = frozenset("\\`*_~[]()!|$:@#")


def md_cell(text: str) -> str:
    """``text`` as the content of a cell of a GitHub-flavoured Markdown table: one line,
    its controls escaped (:func:`one_line`), every punctuation character a literal, so
    that ``![img](...)``, ``<img>``, ``[link](...)`` and ``|`` show as text and the
    table keeps its columns."""
    out = []
    for ch in one_line(text):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MD_PUNCTUATION:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def md_code(text: str) -> str:
    """``text`` as a Markdown code span (shown verbatim, in a monospace font): one line,
    fenced by more backticks than it holds in a row, so that none can end it early."""
    text = one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def in_github_actions(env: Mapping[str, str] | None = None) -> bool:
    """Whether this runs in a GitHub Actions job (``GITHUB_ACTIONS=true``), whose runner
    reads workflow commands in everything the job prints."""
    return (os.environ if env is None else env).get("GITHUB_ACTIONS") == "true"


def _token(text: str) -> str:
    # Fresh for every block: a token that robot output could know (or that appears in
    # the text itself) would let it end the block and have its commands acted on again.
    import secrets  # lazily: a pytest run that rents nothing fences no output

    while True:
        token = secrets.token_hex(16)
        if token not in text:
            return token


def fence_block(text: str, env: Mapping[str, str] | None = None) -> str:
    """Under GitHub Actions, ``text`` between ``::stop-commands::TOKEN`` and ``::TOKEN::``
    lines, so that the runner acts on no workflow command in it; otherwise ``text``.
    For text printed as it is, from the start of a line (a report section)."""
    if not text or not in_github_actions(env):
        return text
    token = _token(text)
    return f"::stop-commands::{token}\n{text}\n::{token}::"


def fence_prefixed(text: str, env: Mapping[str, str] | None = None) -> str:
    """As :func:`fence_block`, for text that may be printed with a prefix on each line
    (pytest shows an exception's message as ``E   <line>``): the runner reads a
    ``::command::`` only at the start of a line, so markers of that form after the prefix
    would do nothing, while it reads the legacy ``##[command]`` form anywhere in a line,
    robot output's and ours alike. So the markers are of that form here:
    ``##[stop-commands]TOKEN`` and ``##[TOKEN]``; they also stop the ``::`` commands of
    the lines between them."""
    if not text or not in_github_actions(env):
        return text
    token = _token(text)
    return f"##[stop-commands]{token}\n{text}\n##[{token}]"


@contextmanager
def commands_stopped(write: Callable[[str], Any],
                     env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Under GitHub Actions, ``write`` the ``::stop-commands::TOKEN`` line on entry and
    ``::TOKEN::`` on exit, however the block exits (an exception left inside it must
    not leave the rest of the job's commands stopped); otherwise nothing. For output
    written a line at a time (a table, a listing)."""
    if not in_github_actions(env):
        yield
        return
    token = _token("")
    write(f"::stop-commands::{token}")
    try:
        yield
    finally:
        write(f"::{token}::")


# What a Mermaid gantt chart reads as syntax inside a title, a section or a task's name:
# ``:`` ends a task's name, ``;`` and a line break end a statement, ``#`` and ``%%`` begin
# comments and entities, ``<``, ``>``, ``&``, quotes and braces are HTML or directives to
# its renderer, and a backtick could end the Markdown fence the chart sits in.
_MERMAID_UNSAFE = frozenset(":;#%<>&\"'`{}|\\")


def mermaid_text(text: str, limit: int = 80) -> str:
    """``text`` as plain words in a Mermaid gantt chart (a section or a task's name): one
    line, ``::`` shown as ``→``, every character Mermaid could read as syntax replaced by
    ``_`` (``:`` by ``.``), at most ``limit`` characters; never empty."""
    text = one_line(text).replace("::", " → ")
    out = "".join("." if ch == ":" else "_" if ch in _MERMAID_UNSAFE or not ch.isprintable()
                  else ch for ch in text)
    out = " ".join(out.split())
    if len(out) > limit:
        out = out[:limit - 1] + "…"
    return out or "_"
