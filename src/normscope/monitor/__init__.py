"""Per-layer telemetry of normalization layers: :class:`Monitor`, its findings, sinks and run files.

``import normscope.monitor`` imports torch and the standard library only; optional sinks that need
more (Prometheus, TensorBoard) import their dependencies when constructed.
"""

from normscope.monitor._monitor import SNAPSHOT_FORMAT, Monitor, load_snapshot, save_snapshot
from normscope.monitor.findings import FINDING_KINDS, SEVERITIES, Finding, Thresholds
from normscope.monitor.prometheus import PrometheusSink
from normscope.monitor.sinks import JSONLSink, Sink, Table, load
from normscope.monitor.tensorboard import TensorBoardSink

__all__ = [
    "Monitor",
    "Finding",
    "Thresholds",
    "FINDING_KINDS",
    "SEVERITIES",
    "Sink",
    "JSONLSink",
    "PrometheusSink",
    "TensorBoardSink",
    "Table",
    "load",
    "save_snapshot",
    "load_snapshot",
    "SNAPSHOT_FORMAT",
]
