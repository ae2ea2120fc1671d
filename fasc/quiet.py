"""Silence transformers while the library loads or saves a model (the library never prints)."""

from __future__ import annotations


class quiet_transformers:
    """Context manager: transformers' logging at error level and its progress bars off, restored on exit."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf = hf_logging
        self.verbosity = hf_logging.get_verbosity()
        self.bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.hf.set_verbosity(self.verbosity)
        if self.bar:
            self.hf.enable_progress_bar()
