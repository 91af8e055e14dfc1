"""mechbook: hooking, patching and vector decoding for the book's chapters."""

import time as _time
import warnings as _warnings

# When this process first imported mechbook: a chapter's start, for the wall time in its provenance
# (mechbook.book.provenance). Papermill runs every chapter in a fresh kernel whose first code cell
# after the parameters imports mechbook.
_IMPORTED_AT = (_time.time(), _time.monotonic())

# transformers and transformer-lens import tqdm.auto, which warns on stderr in a kernel
# without ipywidgets; our own bars are plain tqdm, hidden when stderr is not a terminal.
_warnings.filterwarnings("ignore", message="IProgress not found")

from mechbook.core.errors import MechbookError
from mechbook.backends import load_model, use_backend
from mechbook.core.loading import DEFAULT_MODEL, LoadedModel, known_models

__all__ = ["DEFAULT_MODEL", "LoadedModel", "MechbookError", "known_models", "load_model", "use_backend"]
__version__ = "0.1.0"
