"""Diagnostics: every problem with a spec is a `SpecError` that points into the source.

A `SpecError` renders like a compiler diagnostic::

    alibi.attn:3:37: error: unknown name 'slope'
        score = dot(q, k) * D ** -0.5 + slope[h] * (j - i)
                                        ^^^^^
    hint: did you mean 'slopes'?
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

_WINDOW = 100  # characters of a long source line shown around the error
# Characters that would garble or break a rendered diagnostic: control characters other than tab (a CR moves
# the cursor back) and lone surrogates (not encodable: printing the message would raise). Each is shown as
# U+FFFD, one character for one, so that the caret stays under the right column.
_UNSHOWABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def _showable(text: str) -> str:
    return _UNSHOWABLE.sub("\ufffd", text)


@dataclass(frozen=True)
class Span:
    """A region of the source: 1-based line and column, end column exclusive (on the start line)."""

    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def caret(self, source_line: str) -> str:
        start = max(self.col - 1, 0)
        if self.end_line in (None, self.line) and self.end_col is not None and self.end_col > self.col:
            width = self.end_col - self.col
        else:
            width = 1
        width = max(1, min(width, max(len(source_line) - start, 1)))
        # Keep tabs so that the caret lines up under the offending character.
        pad = "".join("\t" if c == "\t" else " " for c in source_line[:start])
        return pad + "^" * width


class SpecError(Exception):
    """An error in a `.attn` spec, located at `file:line:col` with a hint where one helps."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        hint: str | None = None,
        filename: str | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.filename = filename
        self.source = source

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def with_source(self, filename: str, source: str) -> SpecError:
        """Attach the file name and text (done once, where the whole spec is known)."""
        if self.filename is None:
            self.filename = filename
        if self.source is None:
            self.source = source
        return self

    def format(self) -> str:
        # A file name may hold anything a file system allows (newlines, surrogate-escaped bytes): escape it.
        name = self.filename or "<spec>"
        if _UNSHOWABLE.search(name):
            name = name.encode("unicode_escape").decode("ascii")
        if self.span is None:
            head = f"{name}: error: {self.message}"
            lines = [head]
        else:
            head = f"{name}:{self.span.line}:{self.span.col}: error: {self.message}"
            lines = [head]
            if self.source is not None:
                src_lines = self.source.split("\n")  # lark counts lines by "\\n" only
                if 1 <= self.span.line <= len(src_lines):
                    src = _showable(src_lines[self.span.line - 1])
                    caret = self.span.caret(src)
                    # Very long lines are shown as a window around the caret.
                    start = max(0, self.span.col - 1 - _WINDOW // 2)
                    if len(src) > _WINDOW:
                        prefix = "..." if start > 0 else ""
                        src = prefix + src[start : start + _WINDOW]
                        caret = " " * len(prefix) + caret[start : start + _WINDOW]
                    lines.append("    " + src)
                    lines.append("    " + caret)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest known name, if one is close enough."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None
