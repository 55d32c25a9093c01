"""File names as the OS gives them, and as text outputs show them.

On Linux a file name is bytes; Python hands a name that is not valid UTF-8 over as a str holding lone surrogates
("surrogateescape": byte 0xE9 becomes U+DCE9). Such a str opens the right file, but it cannot be encoded as UTF-8.
So the code hashes names as the OS's bytes (`name_bytes`), and every text a person or another program reads
(JSON outputs, summaries, printed lines) carries `shown(name)` instead: the undecodable bytes written as
backslash escapes, ``caf\\xe9.png`` for the bytes ``caf<0xE9>.png``. That text is valid UTF-8 and names the file
recognisably; it is for reading, not for opening (the file lists of `embed` keep the exact bytes instead).
"""

from __future__ import annotations

import os


def name_bytes(name: str | os.PathLike) -> bytes:
    """The exact bytes of a file name (what the OS stores), for hashing and byte-exact listings."""
    return os.fsencode(name)


def shown(text: str) -> str:
    """`text` unchanged when it is valid Unicode; else its undecodable bytes as backslash escapes (\\xe9)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte of a file name produces (e.g. from JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
