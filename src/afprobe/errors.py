"""User-facing errors.

Every mistake a user can make (a bad model spec, a malformed dataset, a prompt longer than the context) raises an
`AfprobeError` whose message is one line saying what went wrong and what to do. The CLI prints that line and exits
non-zero without a traceback; library users can catch the class.
"""

from __future__ import annotations


class AfprobeError(Exception):
    """An error caused by the user's input, with a one-line message naming the fix."""


class ModelLoadError(AfprobeError):
    """The model spec could not be resolved or loaded."""


class DatasetError(AfprobeError):
    """The dataset spec could not be read or has no usable rows."""


class PromptError(AfprobeError):
    """A prompt could not be rendered, or does not fit the model."""
