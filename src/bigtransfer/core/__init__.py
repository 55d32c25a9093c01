"""Foundations every layer uses: user errors, atomic writes, path display, setting checks, run-folder ownership."""
