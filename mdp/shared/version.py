"""The version of this distribution, as services and adapters report it."""

from importlib import metadata

try:
    VERSION = metadata.version("mdp")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0.1.0"
