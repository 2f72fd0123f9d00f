"""The package under test is the built wheel, installed, at the binary's
version, with the SQLAlchemy run-tests.sh meant to test it with."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import tomllib
from importlib.metadata import distribution
from pathlib import Path

import pytest
import sqlalchemy
from packaging.requirements import Requirement
from packaging.version import Version

import authz_outbox_host

from .conftest import REPO, binary

SOURCE = REPO / "examples" / "python-host"


def test_the_tests_import_the_installed_wheel_not_the_source_tree():
    imported = Path(authz_outbox_host.__file__).resolve()
    assert not imported.is_relative_to(SOURCE.resolve()), imported
    assert imported.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), imported
    installed = distribution("authz-outbox-host")
    assert (installed.read_text("INSTALLER") or "").strip() == "pip"
    files = {str(f) for f in installed.files or []}
    assert "authz_outbox_host/__init__.py" in files
    assert "authz_outbox_host/contract.py" in files
    assert "authz_outbox_host/py.typed" in files


def test_the_version_is_the_binarys():
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
    installed = distribution("authz-outbox-host").version
    assert Version(installed) == Version(cargo)
    assert authz_outbox_host.__version__ == installed
    out = subprocess.run(
        [binary("authz-outbox"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "authz-outbox"
    assert Version(out[1]) == Version(installed)


def test_the_declared_sqlalchemy_range_admits_the_one_under_test():
    expected = os.environ.get("AUTHZ_OUTBOX_HOST_EXPECT_SQLALCHEMY")
    if expected is None:
        pytest.skip("not run by run-tests.sh (AUTHZ_OUTBOX_HOST_EXPECT_SQLALCHEMY unset)")
    assert sqlalchemy.__version__.startswith(f"{expected}."), sqlalchemy.__version__
    requires = distribution("authz-outbox-host").requires or []
    (sqla,) = [r for r in map(Requirement, requires) if r.name.lower() == "sqlalchemy"]
    assert sqla.specifier.contains(sqlalchemy.__version__), (sqla, sqlalchemy.__version__)
