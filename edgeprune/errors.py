"""The one exception type users see, and the exit codes a release pipeline gates on (DESIGN.md §4)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug in edgeprune: the one-line message says how to get the traceback
    BAD_INPUT = 2
    BUDGET_UNREACHABLE = 3
    QUALITY_GATE = 4
    DEVICE_UNREACHABLE = 5
    INTERRUPTED = 130  # SIGINT (Ctrl-C), 128 + 2
    TERMINATED = 143  # SIGTERM (CI cancellation, systemctl stop), 128 + 15


def first_line(e: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first non-blank line of an exception's message, cut to `limit` characters: what a one-line error quotes of
    a library's (often multi-line, sometimes empty) text. An empty message gives `default`, or the exception's type."""
    line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__ if default is None else default)
    return line[:limit]


class EdgePruneError(Exception):
    """A problem the user can fix: the message says what was wanted, what was found and what to do.

    `cli/commands.py` prints it as one line, `edgeprune: error: <message>`, and exits with `code`.
    """

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.code = ExitCode(code)


class QualityGateFailed(EdgePruneError):
    """A recovery training that diverged (`recovery.train`): it leaves no model to judge, so it stops the job. A
    model that fails a gate does not raise: its job returns exit code 4 (`report.contract.verdict`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.QUALITY_GATE)


class DeviceUnreachable(EdgePruneError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.DEVICE_UNREACHABLE)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that every `finally` and context
    manager cleans up (temporary folders, the agent's uploads) before the process exits with 143."""
