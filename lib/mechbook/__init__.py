"""mechbook: hooking, patching and vector decoding for the book's chapters."""

from mechbook.errors import MechbookError
from mechbook.models import DEFAULT_MODEL, LoadedModel, known_models, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "MechbookError", "known_models", "load_model"]
__version__ = "0.1.0"
