"""The errors a user sees as one line: every bad input and every failed run is one of these.

The command line (``proteus/cli.py``) prints the message without a traceback and exits with the
error's ``exit_code``: 2 for input a user can fix, 1 for a run that cannot go on, 128 + the
signal for an interrupted one.
"""

from __future__ import annotations


class ProteusError(ValueError):
    """Bad input a user can fix (an option, a file, a checkpoint): the command line prints the
    message on one line and exits with ``exit_code`` (2)."""

    exit_code = 2


class ConfigError(ProteusError):
    """A bad preset, option or value."""


class RunFailed(ProteusError):
    """A run that cannot go on (diverged, lost a peer, cannot write its files): one line, exit
    code 1, and nothing final written."""

    exit_code = 1


class RunInterrupted(ProteusError):
    """SIGTERM or SIGINT: the message says what was saved and how to resume; the exit code is
    the shell's for that signal (128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
