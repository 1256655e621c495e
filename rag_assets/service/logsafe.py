"""Control characters from clients never reach a log or a terminal raw.

Ids, paths and error messages in the service's log records can carry what a client sent (or what a
database or an embedding API answered). An ESC sequence would be interpreted by the terminal that
shows the log (retitle it, clear it, hide lines), a newline would forge a log record, a bidi override
would reorder what the reader sees. :func:`escape_controls` writes each such character as a Python
escape (``\\x1b``, ``\\n``, ``\\u202e``); :class:`EscapeControls` applies it to every record of a
logger, message and traceback alike.
"""

from __future__ import annotations

import logging
import re
import traceback

# C0 and C1 controls and DEL, line/paragraph separators, and the bidirectional formatting characters
# (Trojan Source, CVE-2021-42574). Other format characters (ZWJ in emoji, soft hyphen) are left alone.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_NEWLINES = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escape(m: re.Match[str]) -> str:
    return m.group().encode("unicode_escape").decode("ascii")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control, separator and bidi formatting character escaped."""
    return (_UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE).sub(_escape, text)


class EscapeControls(logging.Filter):
    """A logger filter: the record's message (arguments merged) and traceback, escaped.

    The message is escaped entirely (a newline in it would start a forged record); a traceback keeps
    its own line breaks, with everything else escaped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: log what we have rather than nothing
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = escape_controls(record.exc_text, keep_newlines=True)
        if record.stack_info:
            record.stack_info = escape_controls(record.stack_info, keep_newlines=True)
        return True


def install(*names: str) -> None:
    """Add one :class:`EscapeControls` to each named logger (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, EscapeControls) for f in logger.filters):
            logger.addFilter(EscapeControls())
