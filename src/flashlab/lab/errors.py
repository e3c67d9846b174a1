"""The one exception the lab raises for bad input: the CLI prints its message and exits with 2."""

from __future__ import annotations


class LabError(Exception):
    """Bad input to the lab (unknown provider, malformed suite, impossible case, unwritable path).

    The message is one line that names the problem; ``flashlab`` prints it and exits with code 2.
    """
