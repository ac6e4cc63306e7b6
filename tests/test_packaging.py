"""pyproject.toml: the wheel installs one import name, `weclip` (with everything the checkout's packages hold), and the
console script runs from it."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "manifests")


def test_the_wheel_holds_the_weclip_package_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    wheel, = tmp_path.glob("weclip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"weclip"}
    checkout = {f"weclip/{p.relative_to(REPO).as_posix()}" for package in PACKAGES
                for p in (REPO / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert checkout <= names, sorted(checkout - names)[:5]  # no module or data file of the checkout left out
    assert {"weclip/__init__.py", "weclip/cli.py"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "weclip = weclip.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
