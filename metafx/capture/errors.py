"""The capture's one error: its input is unusable (files, lengths, support, checkpoint)."""
from __future__ import annotations


class CaptureError(ValueError):
    """The capture's input is unusable (files, lengths, support, checkpoint); the message names the file and the fix."""
