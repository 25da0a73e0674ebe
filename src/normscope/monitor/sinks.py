"""Where the monitor's records go: the :class:`Sink` interface, :class:`JSONLSink`, and :func:`load`.

A record is a flat ``dict`` (values are numbers, strings, None or lists of numbers) with a ``"type"``:

* ``"run"``: written once, before the first window: layer names and kinds, histogram edges, options;
* ``"layer_stats"``: one per monitored layer and flushed window;
* ``"finding"``: one per :class:`~normscope.monitor.Finding`.

A sink receives the records of each flush in one :meth:`Sink.write` call. The monitor calls sinks
fail-soft: a sink whose ``write`` or ``close`` raises is reported once with a ``RuntimeWarning`` and
disabled; the run, the other sinks and the records the monitor keeps in memory are not affected.
"""

from __future__ import annotations

import json
import os
from typing import IO, Iterable, List, Optional, Sequence, Union

__all__ = ["Sink", "JSONLSink", "Table", "load"]

PathLike = Union[str, "os.PathLike[str]"]


class Sink:
    """Base class of the monitor's outputs: override :meth:`write`, and :meth:`close` if needed.

    Example::

        >>> class PrintSink(normscope.monitor.Sink):
        ...     def write(self, records):
        ...         for r in records:
        ...             if r["type"] == "finding":
        ...                 print(r["message"])
    """

    def write(self, records: Sequence[dict]) -> None:
        """Receive the records of one flush (a run record, layer statistics, findings)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; called once by :meth:`normscope.Monitor.close`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class JSONLSink(Sink):
    """Writes each record as one JSON line to ``path``.

    The file is opened on the first write (truncated, or appended to with ``append=True``) and the
    lines of each flush are flushed to the operating system together. Non-finite floats are written
    as the tokens ``NaN`` / ``Infinity`` that Python's ``json`` (and :func:`load`) read back.

    Args:
        path: the file to write: a regular file (a symbolic link writes its target), a FIFO, a device or
            ``-`` (standard output).
        append: append to an existing file instead of truncating it. Default: False.
    """

    def __init__(self, path: PathLike, *, append: bool = False):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Expected path to be a str or os.PathLike, but got {type(path).__name__}")
        self.path = os.fspath(path)
        self.append = bool(append)
        self._file: Optional[IO[str]] = None

    def write(self, records: Sequence[dict]) -> None:
        if self._file is None:
            from normscope._paths import open_stream

            # through symbolic links (appended to / truncated at the target), FIFOs and devices directly
            self._file = open_stream(self.path, append=self.append)
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JSONLSink({self.path!r})"


class Table(list):
    """A list of flat record dicts, as read by :func:`load`, with a few conveniences."""

    def where(self, **equal) -> "Table":
        """The rows whose fields equal the given values, e.g. ``table.where(type="finding")``."""
        return Table(r for r in self if all(r.get(k) == v for k, v in equal.items()))

    def column(self, name: str) -> List:
        """The values of field ``name``, None where a row lacks it."""
        return [r.get(name) for r in self]

    def to_pandas(self):
        """This table as a ``pandas.DataFrame`` (requires pandas, which normscope does not depend on)."""
        try:
            import pandas
        except ImportError as e:
            raise ImportError("Table.to_pandas() requires pandas: pip install pandas") from e
        return pandas.DataFrame(list(self))


def load(path: PathLike, *, type: Optional[str] = None) -> Table:
    """Read a JSONL run written by :class:`JSONLSink` back into a :class:`Table` of flat dict rows.

    Args:
        path: the JSONL file.
        type: keep only records of this type (``"run"``, ``"layer_stats"`` or ``"finding"``).

    Example::

        >>> rows = normscope.monitor.load("run.jsonl", type="layer_stats")
        >>> [(r["layer"], r["var_mean"]) for r in rows if r["step"] == 100]
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected path to be a str or os.PathLike, but got {_type_name(path)}")
    with open(path, encoding="utf-8") as f:
        rows: Iterable[dict] = (json.loads(line) for line in f if line.strip())
        return Table(r for r in rows if type is None or r.get("type") == type)


def as_sink_list(sinks) -> List["Sink"]:
    """``sinks`` (None, one sink or a sequence of them) as a new list."""
    if sinks is None:
        return []
    if isinstance(sinks, Sink) or (hasattr(sinks, "write") and not isinstance(sinks, (list, tuple))):
        return [sinks]
    return list(sinks)


def _type_name(obj) -> str:
    return obj.__class__.__name__
