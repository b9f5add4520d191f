"""What a user reads: the `cnnlab` logger hierarchy on stderr (and a log file), progress bars only on a terminal."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)
_console_level = logging.INFO  # what the user asked to see on stderr (library use: INFO, bars on a terminal)
settings: tuple | None = None  # setup's arguments, for worker processes to log the same way


def setup(verbosity: int = 0, log_file: str | None = None) -> None:
    """The CLI's logging: -q (verbosity -1) warnings only, -v (1) debug and MLflow's info; warnings as log records."""
    global _console_level, settings
    settings = (verbosity, log_file)
    _console_level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    console = _Stderr()
    console.setLevel(_console_level)
    handlers: list[logging.Handler] = [console]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S" if handler is console else None))
    logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True)
    logging.getLogger("cnnlab").setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    logging.captureWarnings(True)
    adopt(*(name for name in ("mlflow", "alembic", "optuna") if name in sys.modules))


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (pytest swaps it per test)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def adopt(*names: str) -> None:
    """Libraries' loggers (MLflow, Optuna) write through ours, console and files, at warning level (info with -v).

    They install their own stderr handlers on import: the modules that import them call this, which acts only once
    the CLI has set logging up."""
    if not logging.getLogger().handlers:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download: noise
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
        logger.setLevel(logging.INFO if _console_level <= logging.DEBUG else logging.WARNING)


def bars() -> bool:
    """Progress bars only on a terminal, and not under -q."""
    return sys.stderr.isatty() and _console_level <= logging.INFO


@contextlib.contextmanager
def to_file(path: Path):
    """Also write the `cnnlab` records (info and up, whatever the console shows) to `path` while the block runs."""
    logger = logging.getLogger("cnnlab")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:  # library use: unconfigured, the records would not be made
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def progress(items, total: int | None, what: str, after: float = 0.0, every: float = 0.1):
    """Yield `items`, showing progress once `after` seconds have passed: a bar on a terminal, else a log line every
    10% (or every 10,000 items when the total is unknown)."""
    if bars():
        yield from tqdm(items, total=total, desc=what, leave=False, delay=after)
        return
    step, t0 = max(1, int(total * every)) if total else 10_000, time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if (i % step == 0 or i == total) and time.monotonic() - t0 >= after:
            done = f"{i / total:.0%} ({i:,}/{total:,})" if total else f"{i:,}"
            log.info("%s: %s in %.0f s", what, done, time.monotonic() - t0)


def table(rows: list[tuple], header: tuple, markdown: bool = True) -> str:
    """Rows in aligned columns under a header: a Markdown table, or plain text for a terminal."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [[c.ljust(w) for c, w in zip(r, widths)] for r in cells]
    if not markdown:
        return "\n".join("  ".join(r).rstrip() for r in lines)
    row = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
    return "\n".join([row(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(row, lines[1:])])


def duration(seconds: float) -> str:
    """1:02:03 or 2:03."""
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
