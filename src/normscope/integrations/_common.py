"""What the trainer callbacks share: a sink that hands the monitor's findings to the trainer's logs."""

from __future__ import annotations

import logging
from typing import Callable, List, Sequence

from normscope.monitor.sinks import Sink, as_sink_list

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class FindingLogSink(Sink):
    """Logs each finding record of a flush on ``logger``, then calls ``report(findings)`` once if any."""

    def __init__(self, logger: logging.Logger, report: Callable[[List[dict]], None]):
        self._logger = logger
        self._report = report

    def write(self, records: Sequence[dict]) -> None:
        found = [r for r in records if r.get("type") == "finding"]
        for r in found:
            self._logger.log(_LEVELS.get(r["severity"], logging.WARNING), "normscope: %s", r["message"])
        if found:
            self._report(found)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._logger.name})"


def monitor_kwargs(kwargs: dict, sink: Sink) -> dict:
    """``kwargs`` for :class:`normscope.Monitor` with ``sink`` added to the user's sinks."""
    kwargs = dict(kwargs)
    kwargs["sinks"] = as_sink_list(kwargs.pop("sinks", None)) + [sink]
    return kwargs
