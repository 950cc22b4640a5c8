"""Errors a user is meant to read.

Library code raises these instead of printing or exiting: the CLI turns them into a one-line message and an
exit code, the tab shows them in red, the API answers 4xx with the message. Anything else that escapes is a bug.
"""

from __future__ import annotations


class LoraTrainError(Exception):
    """Base class: the message is one line a user can act on."""


class BadInput(LoraTrainError):
    """A setting, file or name the user gave is wrong (missing file, bad value, unsafe name)."""


class IncompatibleFile(LoraTrainError):
    """A file does not fit the model or format it is used with (wrong architecture, corrupt, truncated)."""


class TrainingFailed(LoraTrainError):
    """Training stopped for a reason the user must act on (NaN loss, out of memory)."""
