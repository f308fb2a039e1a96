"""Exceptions that carry a one-line message meant for the user."""

from __future__ import annotations


class ScsnnError(Exception):
    """Base class: the message is shown to the user as it is, on one line."""


class InputError(ScsnnError, ValueError):
    """The input data cannot be used (missing file, key, bad values, too few genes...)."""


class ModelError(ScsnnError, ValueError):
    """A model directory is missing, damaged, foreign or from a newer scsnn."""
