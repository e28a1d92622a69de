"""The one exception type for a user's mistake.

The CLI catches it, prints its message on one line and exits with code 2, so a
bad flag, YAML key, path or data line never shows a traceback.
"""


class UserError(ValueError):
    """A mistake in what the user gave us (a config value, a file, a line).

    A ValueError, so that a caller of the Python API (memtune.load_model, memtune.apply, ...)
    catches one standard exception naming the option and what is allowed."""

    exit_code = 2


EXIT_OOM = 3  # out of memory: a result (metrics.json status "oom"), not a crash

# What the allocators say when they cannot give the memory asked for: CUDA's caching allocator
# ("CUDA out of memory") and the CPU one ("DefaultCPUAllocator: can't allocate memory").
_OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure on a GPU or a CPU (torch's OutOfMemoryError, its CPU allocator, MemoryError)."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    import sys

    torch = sys.modules.get("torch")  # only torch raises its own error type; no import for other errors
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(message in text for message in _OOM_MESSAGES)
