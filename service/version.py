"""The installed lpnet package's version, as the API and `lpnet --version` report it."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """The version of the installed ``lpnet`` distribution (``0+unknown`` when it is not installed)."""
    try:
        return metadata.version("lpnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"
