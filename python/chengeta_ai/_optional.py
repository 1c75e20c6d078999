"""Optional dependencies: the error that names the extra installing a missing one."""

from __future__ import annotations

__all__ = ["missing_extra"]


def missing_extra(package: str, feature: str, extra: str | None = None) -> ModuleNotFoundError:
    """The error for an optional dependency that is not installed, naming the extra that
    installs it: ``RedisBackend needs the 'redis' package, which is not installed: pip install
    'chengeta_ai[redis]'``. A `ModuleNotFoundError` (so an `ImportError`), like the one it
    replaces, with the same ``name``."""
    return ModuleNotFoundError(
        f"{feature} needs the {package!r} package, which is not installed: "
        f"pip install 'chengeta_ai[{extra or package}]'",
        name=package,
    )
