"""The one error hierarchy. Every message tells the user what to change; the CLI prints it on one
line and exits with code 2."""


class VitCompactError(Exception):
    """Base class of every error vitcompact raises on purpose."""


class ConfigError(VitCompactError, ValueError):
    """An argument or configuration value is out of range or unknown."""


class UnsupportedModelError(VitCompactError):
    """The model (or one of its modules) is not a ViT layout vitcompact can prune."""


class MaskError(VitCompactError):
    """Masks do not match the model, or are not quasi-structured where they must be."""


class ArtifactError(VitCompactError):
    """A file or artifact directory is missing, corrupt, or does not match its config."""


class TrainingError(VitCompactError):
    """Training diverged (a non-finite loss); nothing of the diverged run is saved."""


class DataError(VitCompactError):
    """A dataset is missing, corrupt, or unsuitable."""


class BackendUnavailableError(VitCompactError):
    """An optional backend (TensorRT, CUDA, ...) is not installed or has no device."""


def one_line(error: BaseException) -> str:
    """`error`'s message on one line. An error raised in a DataLoader worker (a corrupt image read
    lazily) reaches the main process with torch's "Caught ... in DataLoader worker" line and the
    worker's traceback before the message: the message is the traceback's last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")
    return lines[0]
