"""Leyline: the wire contracts between Kasmina, its controller and its trainer (docs/design.md §5).

``proto/leyline.proto`` (proto3, package ``esper.leyline``) defines the signed
``AdaptationCommand`` and its payloads (seed, rollback and optimizer commands), the
``TelemetryPacket`` and ``SystemStatePacket``, and the enums, among them ``SeedLifecycleStage``,
whose values equal ``kasmina.stages.SeedStage``.

- ``leyline_pb2`` -- the generated Python of the .proto, committed (never edited by hand).
- ``regen`` -- regenerates it with a pinned protoc (``make proto``); the test that fails when the
  committed code is stale calls it too.

This file re-exports the messages so that every other module imports them from
``kasmina.leyline``, never from the generated module: the one package besides ``kasmina.ops``
that re-exports (none of its names is in ``kasmina``'s table).
"""

from kasmina.leyline.leyline_pb2 import (
    AdaptationCommand,
    CommandMetadata,
    CommandType,
    MessagePriority,
    Metric,
    MetricType,
    OptimizerCommand,
    RollbackCommand,
    SeedCommand,
    SeedLifecycleStage,
    SeedOperation,
    SystemStatePacket,
    TelemetryPacket,
)

__all__ = [
    "AdaptationCommand",
    "CommandMetadata",
    "CommandType",
    "MessagePriority",
    "Metric",
    "MetricType",
    "OptimizerCommand",
    "RollbackCommand",
    "SeedCommand",
    "SeedLifecycleStage",
    "SeedOperation",
    "SystemStatePacket",
    "TelemetryPacket",
]
