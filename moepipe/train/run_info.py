"""Provenance recorded with every result: git commit, package versions, machine."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("moepipe", "torch", "hydra-core", "omegaconf", "wandb", "einops", "fairscale", "numpy")


def git_state(path: str) -> str | None:
    """The commit of the checkout holding `path` (with '-dirty' when tracked files have
    uncommitted changes), or None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """This moepipe checkout's commit (with '-dirty' when it has uncommitted changes), or None."""
    return git_state(os.path.dirname(os.path.abspath(__file__)))


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_info() -> dict:
    return {"git_commit": git_commit(), "packages": package_versions(), "environment": environment()}
