import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_CONSTRAINT_COMPLETE: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_CONSTRAINT_COMPLETE: FinishReason

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("blob",)
    BLOB_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    def __init__(self, blob: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("blob", "ttl")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    ttl: _duration_pb2.Duration
    def __init__(self, blob: _Optional[bytes] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("prompt", "ttl")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    ttl: _duration_pb2.Duration
    def __init__(self, prompt: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "prompt_tokens", "unknown_chars", "unknown_char_count", "cached_tokens")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHAR_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session: Session
    prompt_tokens: int
    unknown_chars: _containers.RepeatedScalarFieldContainer[str]
    unknown_char_count: int
    cached_tokens: int
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., unknown_chars: _Optional[_Iterable[str]] = ..., unknown_char_count: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "token_count", "create_time", "last_used_time", "expire_time", "ttl", "busy", "rewindable_to")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    REWINDABLE_TO_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_count: int
    create_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    busy: bool
    rewindable_to: int
    def __init__(self, session_id: _Optional[str] = ..., token_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., busy: _Optional[bool] = ..., rewindable_to: _Optional[int] = ...) -> None: ...

class FeedRequest(_message.Message):
    __slots__ = ("session_id", "text", "session_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    session_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., session_tokens: _Optional[int] = ...) -> None: ...

class FeedResponse(_message.Message):
    __slots__ = ("tokens_consumed", "unknown_chars", "session_tokens", "unknown_char_count", "cached_tokens")
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHAR_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens_consumed: int
    unknown_chars: _containers.RepeatedScalarFieldContainer[str]
    session_tokens: int
    unknown_char_count: int
    cached_tokens: int
    def __init__(self, tokens_consumed: _Optional[int] = ..., unknown_chars: _Optional[_Iterable[str]] = ..., session_tokens: _Optional[int] = ..., unknown_char_count: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "logprobs", "session_tokens", "regex", "json_schema", "choices")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    session_tokens: int
    regex: str
    json_schema: str
    choices: ChoiceList
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., session_tokens: _Optional[int] = ..., regex: _Optional[str] = ..., json_schema: _Optional[str] = ..., choices: _Optional[_Union[ChoiceList, _Mapping]] = ...) -> None: ...

class ChoiceList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[str]] = ...) -> None: ...

class ChoiceScore(_message.Message):
    __slots__ = ("text", "logprob", "probability")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    text: str
    logprob: float
    probability: float
    def __init__(self, text: _Optional[str] = ..., logprob: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "token_id", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logprob: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "session_tokens", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    session_tokens: int
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., session_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "logprobs", "finish_reason", "usage", "seed", "choice_scores")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHOICE_SCORES_FIELD_NUMBER: _ClassVar[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: FinishReason
    usage: Usage
    seed: int
    choice_scores: _containers.RepeatedCompositeFieldContainer[ChoiceScore]
    def __init__(self, text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., seed: _Optional[int] = ..., choice_scores: _Optional[_Iterable[_Union[ChoiceScore, _Mapping]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "session_id", "update_session", "session_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SESSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    session_id: str
    update_session: bool
    session_tokens: int
    def __init__(self, text: _Optional[str] = ..., session_id: _Optional[str] = ..., update_session: _Optional[bool] = ..., session_tokens: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("nll", "loss", "perplexity", "bits_per_char", "token_count", "predictions", "unknown_chars", "unknown_char_count", "cached_tokens")
    NLL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHAR_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    nll: float
    loss: float
    perplexity: float
    bits_per_char: float
    token_count: int
    predictions: int
    unknown_chars: _containers.RepeatedScalarFieldContainer[str]
    unknown_char_count: int
    cached_tokens: int
    def __init__(self, nll: _Optional[float] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., bits_per_char: _Optional[float] = ..., token_count: _Optional[int] = ..., predictions: _Optional[int] = ..., unknown_chars: _Optional[_Iterable[str]] = ..., unknown_char_count: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("cell", "num_layers", "hidden_size", "state_size", "vocab_size", "corpus", "held_out_loss", "held_out_perplexity", "held_out_bpc", "opset", "sha256", "exporter", "created", "train_steps", "manifest")
    class Sha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CELL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_BPC_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPORTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    cell: str
    num_layers: int
    hidden_size: int
    state_size: int
    vocab_size: int
    corpus: str
    held_out_loss: float
    held_out_perplexity: float
    held_out_bpc: float
    opset: int
    sha256: _containers.ScalarMap[str, str]
    exporter: str
    created: str
    train_steps: int
    manifest: _struct_pb2.Struct
    def __init__(self, cell: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., state_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., corpus: _Optional[str] = ..., held_out_loss: _Optional[float] = ..., held_out_perplexity: _Optional[float] = ..., held_out_bpc: _Optional[float] = ..., opset: _Optional[int] = ..., sha256: _Optional[_Mapping[str, str]] = ..., exporter: _Optional[str] = ..., created: _Optional[str] = ..., train_steps: _Optional[int] = ..., manifest: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
