"""The pure functions of ``pytest_rerobots.textsafe`` (issue 19, item 4), and a model of
how the GitHub Actions runner reads workflow commands in a job's log, which the tests
of the plugin's output (test_escapes_plugin.py) read that output with."""

from __future__ import annotations

import re

import pytest

from pytest_rerobots.textsafe import (
    block,
    block_lines,
    commands_stopped,
    fence_block,
    fence_prefixed,
    in_github_actions,
    md_cell,
    md_code,
    one_line,
)

GHA = {"GITHUB_ACTIONS": "true"}


class Runner:
    """The GitHub Actions runner's reading of workflow commands, line by line, as its
    ActionCommandManager.TryProcessCommand and ActionCommand.TryParseV2 / TryParse do:
    ``::name props::data`` after leading whitespace, else the legacy ``##[name props]data``
    anywhere in the line; only registered names; after ``stop-commands`` with a token,
    nothing until a command named by that token. ``acted`` lists what it acted on."""

    COMMANDS = frozenset({"add-mask", "error", "warning", "notice", "debug", "group",
                          "endgroup", "set-output", "set-env", "save-state", "add-path",
                          "add-matcher", "remove-matcher", "echo", "stop-commands"})

    def __init__(self) -> None:
        self.stop_token: str | None = None
        self.acted: list[tuple[str, str]] = []

    @staticmethod
    def parse(line: str, registered: set[str]) -> tuple[str, str] | None:
        stripped = line.lstrip()
        if stripped.startswith("::"):
            end = stripped.find("::", 2)
            if end >= 0:
                name = stripped[2:end].split(" ", 1)[0]
                if name.lower() in registered:
                    return name.lower(), stripped[end + 2:]
        start = line.find("##[")
        if start >= 0:
            bracket = line.find("]", start)
            if bracket >= 0:
                name = line[start + 3:bracket].split(" ", 1)[0]
                if name.lower() in registered:
                    return name.lower(), line[bracket + 1:]
        return None

    def feed(self, log: str) -> Runner:
        for line in re.split(r"\r\n|\r|\n", log):
            registered = set(self.COMMANDS)
            if self.stop_token:
                registered.add(self.stop_token.lower())
            parsed = self.parse(line, registered)
            if parsed is None:
                continue
            name, data = parsed
            if self.stop_token is not None:
                if name == self.stop_token.lower():
                    self.stop_token = None
                continue
            if name == "stop-commands":
                self.stop_token = data
                continue
            self.acted.append((name, data))
        return self


def test_the_runner_model_acts_on_both_forms_and_honours_stop_commands():
    log = ("  ::add-mask::secret\nE   ::error::not at the start\nE   x ##[warning]legacy\n"
           "::stop-commands::t0k\n::error::stopped\n##[t0k]\n::notice::again\n")
    assert Runner().feed(log).acted == [("add-mask", "secret"), ("warning", "legacy"),
                                        ("notice", "again")]


# -- control characters ----------------------------------------------------------


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\",
     "\\x1b]8;;https://evil.example\\x1b\\click\\x1b]8;;\\x1b\\"),
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x00\x7f\x9b\x85", "\\x00\\x7f\\x9b\\x85"),
    ("abc\u202edcba", "abc\\u202edcba"),
    ("température ✓ 機器人 🤖", "température ✓ 機器人 🤖"),
])
def test_one_line_shows_every_control_as_an_escape(raw: str, shown: str):
    assert one_line(raw) == shown
    assert one_line(raw).isprintable()


@pytest.mark.parametrize("ordinary", [
    "", "ok\n", "line one\nline two\n", "col\tcol\tcol\n", "température ✓\n機器人\n",
    "no newline at the end", "  indented\n\n  after a blank line\n",
])
def test_a_blocks_ordinary_text_is_unchanged(ordinary: str):
    assert block(ordinary) == ordinary
    assert block_lines(ordinary) == ordinary.splitlines()


def test_a_block_keeps_line_breaks_and_tabs_and_escapes_the_rest():
    assert block("a\r\nb\r\n") == "a\nb\n"  # a serial console's line ends
    # A lone CR breaks the line instead of returning the cursor over what came before.
    assert block_lines("rm -rf done\rall good") == ["rm -rf done", "all good"]
    assert block_lines("\x1b[2Jcleared\t\x1b]0;title\x07\n\x0cpage") == [
        "\\x1b[2Jcleared\t\\x1b]0;title\\x07", "\\x0cpage"]


# -- Markdown --------------------------------------------------------------------


MARKDOWN = re.compile(r"(?<!\\)[!\[\]()`*_~|$:]|<|>|&(?!amp;|lt;|gt;)")


@pytest.mark.parametrize("hostile", [
    "![img](https://evil.example/x.png)", "<img src=x onerror=alert(1)>",
    "[link](https://evil.example)", "a | b", "**bold** _it_ ~~gone~~ `code`",
    "$x^2$ :smile: @someone #1", "line\nbreak", "\x1b[2J", "&amp; &#60;",
])
def test_a_markdown_cell_has_no_markdown_or_html_left(hostile: str):
    cell = md_cell(hostile)
    assert not MARKDOWN.search(cell), cell
    assert "\n" not in cell and cell.isprintable()
    # Unescaped, it reads as what was sent (controls as their escapes).
    unescaped = re.sub(r"\\(.)", r"\1", cell)
    unescaped = unescaped.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert unescaped == one_line(hostile)


def test_a_cell_of_plain_words_is_left_alone():
    assert md_cell("READY 12 s") == "READY 12 s"
    assert md_cell("basic_kobuki") == "basic\\_kobuki"  # shown as basic_kobuki


@pytest.mark.parametrize(("name", "span"), [
    ("t.py::test_x", "`t.py::test_x`"),
    ("t.py::test_x[a`b]", "``t.py::test_x[a`b]``"),
    ("`edge``", "``` `edge`` ```"),
    ("t.py::test[\n]", "`t.py::test[\\n]`"),
])
def test_a_code_span_cannot_be_ended_by_its_text(name: str, span: str):
    assert md_code(name) == span


# -- workflow commands -----------------------------------------------------------


HOSTILE_LOG = "::add-mask::x\n  ::error title=pwned::robot says\nok ##[warning]legacy\n"


def test_only_under_github_actions():
    assert not in_github_actions({}) and not in_github_actions({"GITHUB_ACTIONS": "1"})
    assert in_github_actions(GHA)
    assert fence_block(HOSTILE_LOG, {}) == HOSTILE_LOG
    assert fence_prefixed(HOSTILE_LOG, {}) == HOSTILE_LOG
    written: list[str] = []
    with commands_stopped(written.append, {}):
        written.append("row")
    assert written == ["row"]


def test_the_runner_acts_on_nothing_inside_a_fence_and_on_what_follows_it():
    assert len(Runner().feed(HOSTILE_LOG).acted) == 3  # unfenced, as before
    fenced = fence_block(HOSTILE_LOG, GHA)
    runner = Runner().feed(fenced + "\n::notice::ours\n")
    assert runner.acted == [("notice", "ours")] and runner.stop_token is None
    prefixed = "\n".join(f"E   {line}" for line in fence_prefixed(HOSTILE_LOG, GHA).split("\n"))
    runner = Runner().feed(prefixed + "\n::notice::ours\n")
    assert runner.acted == [("notice", "ours")] and runner.stop_token is None
    # The markers as pytest shows an exception's text (--tb=native: no prefix) work too.
    runner = Runner().feed(fence_prefixed(HOSTILE_LOG, GHA) + "\n::notice::ours\n")
    assert runner.acted == [("notice", "ours")] and runner.stop_token is None


def test_every_fence_has_a_fresh_token():
    tokens = {fence_block("x", GHA).split("\n")[0] for _ in range(20)}
    tokens |= {fence_prefixed("x", GHA).split("\n")[0] for _ in range(20)}
    assert len(tokens) == 40
    assert all(re.fullmatch(r"(::stop-commands::|##\[stop-commands\])[0-9a-f]{32}", t)
               for t in tokens)


def test_commands_stopped_ends_its_block_when_an_error_leaves_it():
    written: list[str] = []
    with pytest.raises(RuntimeError), commands_stopped(written.append, GHA):
        written.append("::error::inside")
        raise RuntimeError
    runner = Runner().feed("\n".join([*written, "::notice::after"]))
    assert runner.acted == [("notice", "after")]


def test_a_tail_of_crlf_output_leaves_nothing_out():
    from pytest_rerobots.transcript import tail

    assert tail("Kobuki bootloader 1.4.2\r\nkobuki> \r\n") == "Kobuki bootloader 1.4.2\nkobuki> "
    assert tail("a\r\n" * 30, lines=2) == "[... 56 characters before ...]\na\na"
