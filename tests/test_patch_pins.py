"""Every patch on another library's internals names the versions it was written against, and requirements.txt
pins exactly those: moving a pin fails here until someone has re-read the patch and updated its
``WRITTEN_AGAINST``."""

from __future__ import annotations

import importlib
import pkgutil
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import tripod.patches

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted(m.name for m in pkgutil.iter_modules(tripod.patches.__path__))


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = re.sub(r"#.*", "", line).strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return pins


def test_the_patch_package_holds_every_patch_the_architecture_page_lists():
    listed = set(re.findall(r"`tripod/patches/(\w+)\.py`", (ROOT / "docs/architecture.md").read_text()))
    assert listed == set(PATCHES)


@pytest.mark.parametrize("name", PATCHES)
def test_requirements_pin_what_the_patch_was_written_against(name):
    module = importlib.import_module(f"tripod.patches.{name}")
    written_against = module.WRITTEN_AGAINST
    assert written_against, f"tripod/patches/{name}.py names no library"
    pins = pinned_requirements()
    for dist, specifier in written_against.items():
        pinned = pins.get(canonicalize_name(dist))
        assert pinned == str(Requirement(f"{dist}{specifier}").specifier), (
            f"requirements.txt pins {dist}{pinned or ' (nothing)'}, but tripod/patches/{name}.py was written against"
            f" {dist}{specifier}: re-read the patch against the new version, then update WRITTEN_AGAINST"
        )
        assert Requirement(f"{dist}{specifier}").specifier.contains(version(dist)), (
            f"installed {dist} {version(dist)} is not the {specifier} tripod/patches/{name}.py was written against"
        )
