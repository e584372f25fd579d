"""Errors a user can act on. The CLI prints these (and ``ValueError`` / ``OSError``) as one
line, ``minild: error: …``, and shows the traceback only with ``minild --debug``."""

from __future__ import annotations


class UnavailableError(RuntimeError):
    """Something a stage needs (data, weights, a package) is not on disk and cannot be fetched;
    the message says how to get it. Plugins subclass it for their own resources."""


class GenerateArgumentError(ValueError):
    """An argument of ``Pipeline.generate`` (or ``minild sample``) is of the wrong kind or out of range."""
