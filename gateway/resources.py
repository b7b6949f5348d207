"""Where XIG finds the files it ships next to the code: the XSDs (``schemas/``) and WSDLs (``wsdl/``).

The project root is the directory holding both. By default it is the parent of the ``gateway`` package
directory (the source checkout or editable install); the environment variable ``XIG_HOME`` overrides it,
e.g. for an installation that keeps the resources elsewhere. The variable is read on every call, so a
test or a CLI can set it at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import XigError

#: Environment variable naming the directory that holds ``schemas/`` and ``wsdl/``.
XIG_HOME_ENV = "XIG_HOME"


class ResourceDirectoryError(XigError):
    """A resource directory is missing; a deployment problem, never a partner's fault."""


def _default_root() -> Path:
    return Path(__file__).resolve().parent.parent


def project_root() -> Path:
    """The directory holding ``schemas/`` and ``wsdl/`` (``$XIG_HOME`` or the checkout root)."""
    override = os.environ.get(XIG_HOME_ENV, "").strip()
    if override:
        root = Path(override).expanduser().resolve()
        origin = f"${XIG_HOME_ENV}={override!r}"
    else:
        root = _default_root()
        origin = "the parent of the gateway package"
    if not root.is_dir():
        raise ResourceDirectoryError(f"XIG project root {root} ({origin}) is not a directory")
    return root


def _subdir(name: str) -> Path:
    root = project_root()
    path = root / name
    if not path.is_dir():
        raise ResourceDirectoryError(
            f"resource directory {path} is missing; set ${XIG_HOME_ENV} to the directory that holds "
            f"'schemas/' and 'wsdl/' (currently {root})"
        )
    return path


def schemas_dir() -> Path:
    """``<root>/schemas``: the XSDs used for validation and served for ``?wsdl``."""
    return _subdir("schemas")


def wsdl_dir() -> Path:
    """``<root>/wsdl``: the WSDL templates rendered for ``?wsdl``."""
    return _subdir("wsdl")
