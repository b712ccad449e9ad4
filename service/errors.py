"""The exceptions of the torch-free side (runtime, service, scoring), documented in one place.

    TextgenError                 an error the user can fix; the CLI prints it as one line
    ├── BundleError              a model bundle that cannot be used
    │   ├── BundleFileMissing    model.onnx or manifest.json is absent
    │   ├── ChecksumMismatch     model.onnx does not match the manifest's sha256
    │   ├── ManifestError        manifest unreadable, of another format version, or missing fields
    │   └── GraphMismatch        the ONNX graph's inputs/outputs disagree with the manifest
    └── InputError               bad user input to a job (scoring rows, CLI arguments)

The gRPC layer maps its own request errors to status codes at one boundary (see service/server.py).
"""


class TextgenError(Exception):
    """Base class of user-facing errors."""


class BundleError(TextgenError):
    pass


class BundleFileMissing(BundleError):
    pass


class ChecksumMismatch(BundleError):
    pass


class ManifestError(BundleError):
    pass


class GraphMismatch(BundleError):
    pass


class InputError(TextgenError):
    pass
