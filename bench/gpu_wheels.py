"""Fill a wheelhouse with what ``make gpu-check`` installs on a GPU machine without a package
registry, whose Python already holds a CUDA build of torch and the scientific stack.

The wheels are the project's runtime dependencies (recursively, as installed in this
environment, at the same versions) minus the large packages such a machine ships
(``PREINSTALLED``), for ``--python-version`` (default 3.12) on manylinux x86-64, plus the
build backend (setuptools, wheel) for the editable install. ``pip download`` fetches them;
nothing is installed here.

    python bench/gpu_wheels.py [--dest wheelhouse] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "integral-superposition"
PREINSTALLED = {
    # large packages a CUDA image already holds (torch's own stack and the scientific one);
    # the project asks only for lower bounds of them
    "torch", "triton", "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "matplotlib",
    "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "accelerate",
    "sympy", "networkx", "pillow", "fonttools", "kiwisolver", "contourpy", "psutil", "regex",
    "pyyaml", "joblib", "threadpoolctl", "mpmath", "fsspec", "setuptools", "pip",
}  # fmt: skip
BUILD = ("setuptools", "wheel")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def closure(name: str = PROJECT, python_version: str | None = None) -> dict[str, str]:
    """``{distribution: installed version}`` of ``name``'s runtime requirements, recursively,
    with environment markers judged for ``python_version`` (default: this Python's)."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    env = env if python_version else {}
    seen: dict[str, str] = {}
    visited: set[tuple[str, str]] = set()  # (distribution, extra): an extra adds requirements

    def walk(dist: str, extras: tuple[str, ...] = ()) -> None:
        key = canonicalize_name(dist)
        todo = [e for e in ("", *extras) if (key, e) not in visited]
        if not todo:
            return
        try:
            d = metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            return  # a requirement for another platform or Python
        visited.update((key, e) for e in todo)
        seen[key] = d.version
        for line in d.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in todo):
                walk(req.name, tuple(req.extras))

    walk(name)
    seen.pop(canonicalize_name(name), None)
    return seen


def wanted(dists: dict[str, str]) -> list[str]:
    """``name==version`` pins for the wheelhouse (big preinstalled and CUDA packages left out)."""
    pins = [
        f"{n}=={v}"
        for n, v in sorted(dists.items())
        if n not in PREINSTALLED and not n.startswith(("nvidia-", "cuda-"))
    ]
    for n in BUILD:
        try:
            pins.append(f"{n}=={metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pins.append(n)
    return pins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default="wheelhouse")
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args()
    pins = wanted(closure(python_version=args.python_version))
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", args.python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    failed = []
    if subprocess.run([*cmd, *pins]).returncode != 0:  # find which ones have no wheel
        failed = [pin for pin in pins if subprocess.run([*cmd, pin]).returncode != 0]
    size = sum(f.stat().st_size for f in dest.glob("*.whl")) / 2**20
    print(f"{len(pins) - len(failed)}/{len(pins)} wheels in {dest} ({size:.1f} MiB)")
    if failed:
        print("no wheel for: " + " ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
