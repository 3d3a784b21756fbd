import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeedLifecycleStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_STAGE_DORMANT: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_ISOLATED_INIT: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_COMPATIBILITY_CHECK: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_GRAFTING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_STABILIZATION: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_ACTIVE: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_COOLDOWN: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_HARVESTING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_RECYCLING: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_QUARANTINE: _ClassVar[SeedLifecycleStage]
    SEED_STAGE_TERMINATED: _ClassVar[SeedLifecycleStage]

class SeedOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_OPERATION_UNSPECIFIED: _ClassVar[SeedOperation]
    SEED_OPERATION_GERMINATE: _ClassVar[SeedOperation]
    SEED_OPERATION_ADVANCE: _ClassVar[SeedOperation]
    SEED_OPERATION_CULL: _ClassVar[SeedOperation]
    SEED_OPERATION_TERMINATE: _ClassVar[SeedOperation]

class CommandType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_TYPE_UNSPECIFIED: _ClassVar[CommandType]
    COMMAND_TYPE_INITIALIZE_HOST: _ClassVar[CommandType]
    COMMAND_TYPE_CREATE_SEED: _ClassVar[CommandType]
    COMMAND_TYPE_STEP: _ClassVar[CommandType]
    COMMAND_TYPE_RESET_STATE: _ClassVar[CommandType]
    COMMAND_TYPE_REGISTER_TEACHER: _ClassVar[CommandType]

class MessagePriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_PRIORITY_UNSPECIFIED: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_LOW: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_NORMAL: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_HIGH: _ClassVar[MessagePriority]
    MESSAGE_PRIORITY_CRITICAL: _ClassVar[MessagePriority]

class MetricType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_TYPE_UNSPECIFIED: _ClassVar[MetricType]
    METRIC_TYPE_COUNTER: _ClassVar[MetricType]
    METRIC_TYPE_GAUGE: _ClassVar[MetricType]
    METRIC_TYPE_HISTOGRAM: _ClassVar[MetricType]
    METRIC_TYPE_EVENT: _ClassVar[MetricType]
SEED_STAGE_DORMANT: SeedLifecycleStage
SEED_STAGE_ISOLATED_INIT: SeedLifecycleStage
SEED_STAGE_COMPATIBILITY_CHECK: SeedLifecycleStage
SEED_STAGE_GRAFTING: SeedLifecycleStage
SEED_STAGE_STABILIZATION: SeedLifecycleStage
SEED_STAGE_ACTIVE: SeedLifecycleStage
SEED_STAGE_COOLDOWN: SeedLifecycleStage
SEED_STAGE_HARVESTING: SeedLifecycleStage
SEED_STAGE_RECYCLING: SeedLifecycleStage
SEED_STAGE_QUARANTINE: SeedLifecycleStage
SEED_STAGE_TERMINATED: SeedLifecycleStage
SEED_OPERATION_UNSPECIFIED: SeedOperation
SEED_OPERATION_GERMINATE: SeedOperation
SEED_OPERATION_ADVANCE: SeedOperation
SEED_OPERATION_CULL: SeedOperation
SEED_OPERATION_TERMINATE: SeedOperation
COMMAND_TYPE_UNSPECIFIED: CommandType
COMMAND_TYPE_INITIALIZE_HOST: CommandType
COMMAND_TYPE_CREATE_SEED: CommandType
COMMAND_TYPE_STEP: CommandType
COMMAND_TYPE_RESET_STATE: CommandType
COMMAND_TYPE_REGISTER_TEACHER: CommandType
MESSAGE_PRIORITY_UNSPECIFIED: MessagePriority
MESSAGE_PRIORITY_LOW: MessagePriority
MESSAGE_PRIORITY_NORMAL: MessagePriority
MESSAGE_PRIORITY_HIGH: MessagePriority
MESSAGE_PRIORITY_CRITICAL: MessagePriority
METRIC_TYPE_UNSPECIFIED: MetricType
METRIC_TYPE_COUNTER: MetricType
METRIC_TYPE_GAUGE: MetricType
METRIC_TYPE_HISTOGRAM: MetricType
METRIC_TYPE_EVENT: MetricType

class CommandMetadata(_message.Message):
    __slots__ = ("nonce", "timestamp", "signature", "key_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    timestamp: _timestamp_pb2.Timestamp
    signature: bytes
    key_id: str
    def __init__(self, nonce: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class SeedCommand(_message.Message):
    __slots__ = ("operation", "seed_id", "kernel_artifact_id", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    SEED_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    operation: SeedOperation
    seed_id: str
    kernel_artifact_id: str
    parameters: _containers.ScalarMap[str, float]
    def __init__(self, operation: _Optional[_Union[SeedOperation, str]] = ..., seed_id: _Optional[str] = ..., kernel_artifact_id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RollbackCommand(_message.Message):
    __slots__ = ("target_epoch", "emergency", "reason")
    TARGET_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target_epoch: int
    emergency: bool
    reason: str
    def __init__(self, target_epoch: _Optional[int] = ..., emergency: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class OptimizerCommand(_message.Message):
    __slots__ = ("command_type", "optimizer_id", "grad_clip_norm", "learning_rate", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COMMAND_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    command_type: CommandType
    optimizer_id: str
    grad_clip_norm: float
    learning_rate: float
    parameters: _containers.ScalarMap[str, float]
    def __init__(self, command_type: _Optional[_Union[CommandType, str]] = ..., optimizer_id: _Optional[str] = ..., grad_clip_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., parameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AdaptationCommand(_message.Message):
    __slots__ = ("command_id", "seed_command", "rollback_command", "optimizer_command", "priority", "timeout", "metadata")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMAND_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_COMMAND_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_COMMAND_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    seed_command: SeedCommand
    rollback_command: RollbackCommand
    optimizer_command: OptimizerCommand
    priority: MessagePriority
    timeout: _duration_pb2.Duration
    metadata: CommandMetadata
    def __init__(self, command_id: _Optional[str] = ..., seed_command: _Optional[_Union[SeedCommand, _Mapping]] = ..., rollback_command: _Optional[_Union[RollbackCommand, _Mapping]] = ..., optimizer_command: _Optional[_Union[OptimizerCommand, _Mapping]] = ..., priority: _Optional[_Union[MessagePriority, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., metadata: _Optional[_Union[CommandMetadata, _Mapping]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "type", "value", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: MetricType
    value: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[MetricType, str]] = ..., value: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TelemetryPacket(_message.Message):
    __slots__ = ("packet_id", "source_subsystem", "timestamp", "metrics")
    PACKET_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SUBSYSTEM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    packet_id: str
    source_subsystem: str
    timestamp: _timestamp_pb2.Timestamp
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    def __init__(self, packet_id: _Optional[str] = ..., source_subsystem: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ...) -> None: ...

class SystemStatePacket(_message.Message):
    __slots__ = ("version", "current_epoch", "validation_accuracy", "training_metrics", "validation_loss", "global_step", "seed_stages")
    class TrainingMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SeedStagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SeedLifecycleStage
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SeedLifecycleStage, str]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_METRICS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    SEED_STAGES_FIELD_NUMBER: _ClassVar[int]
    version: int
    current_epoch: int
    validation_accuracy: float
    training_metrics: _containers.ScalarMap[str, float]
    validation_loss: float
    global_step: int
    seed_stages: _containers.ScalarMap[str, SeedLifecycleStage]
    def __init__(self, version: _Optional[int] = ..., current_epoch: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., training_metrics: _Optional[_Mapping[str, float]] = ..., validation_loss: _Optional[float] = ..., global_step: _Optional[int] = ..., seed_stages: _Optional[_Mapping[str, SeedLifecycleStage]] = ...) -> None: ...
