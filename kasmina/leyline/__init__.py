"""Leyline contracts: generated protobuf messages (``make proto`` regenerates them)."""

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
