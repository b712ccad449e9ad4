"""The exceptions of the training package. The CLI turns each into one line on stderr and a non-zero exit.

    TrainingError
    ├── CorpusError       missing, empty, binary or non-UTF-8 input text
    ├── CheckpointError   missing, corrupt or mismatched checkpoint file
    └── ExportError       an ONNX export that fails its own parity check
"""


class TrainingError(Exception):
    """Base class: an error the user can fix, reported without a traceback."""


class CorpusError(TrainingError):
    pass


class CheckpointError(TrainingError):
    pass


class ExportError(TrainingError):
    pass
