"""The progress display of a training loop: messages, and a tqdm bar or plain step lines, or nothing at all."""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

SHOWS = ("bar", "lines", "messages", "nothing")
LINES_PER_RUN = 20  # "lines" prints about this many step lines in a run, and the last step's


class Progress:
    """What a run shows as it goes, one of SHOWS: a bar that messages print above, a plain line every 1/20 of the
    run (logs and notebooks), the messages only, or nothing (protocols that run many fine-tunes; ranks but 0)."""

    def __init__(self, show: str = "bar", *, desc: str = "training", unit: str = "step",
                 stream: IO[str] | None = None) -> None:
        if show not in SHOWS:
            raise ValueError(f"show must be one of {', '.join(SHOWS)}, got {show!r}")
        self.show, self.desc, self.unit = show, desc, unit
        self.stream = stream  # None: standard output, looked up when printing (so a captured stdout sees it)
        self.bar: Any = None

    def _file(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stdout

    def say(self, msg: str) -> None:
        """Print a message (above the bar, when there is one)."""
        if self.show == "nothing":
            return
        if self.bar is not None:
            self.bar.write(msg, file=self._file())
        else:
            print(msg, file=self._file(), flush=True)

    def start(self, total: int, initial: int = 0) -> None:
        """Begin counting steps from `initial` of `total` (a bar appears only when showing one)."""
        self.total = total
        if self.show == "bar":
            self.bar = tqdm(total=total, initial=initial, unit=self.unit, desc=self.desc, dynamic_ncols=True,
                            file=self.stream)

    def step(self, done: int, postfix: dict[str, str] | None = None, line: str | None = None) -> None:
        """One step done: the bar moves (with `postfix` beside it); `line` is printed on every 1/20 of the run."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.show == "lines" and line and (done % max(1, self.total // LINES_PER_RUN) == 0 or done == self.total):
            print(line, file=self._file(), flush=True)

    def close(self) -> None:
        """Close the bar, if any (a run that stops early leaves it where it got to)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
