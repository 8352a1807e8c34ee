"""lifealign-lite: lifelong preference alignment (FPO on a short-term LoRA, consolidated into a long-term bank).

Importing the package imports nothing heavy (no torch): the CLI's ``--help`` depends on it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lifealign-lite")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
