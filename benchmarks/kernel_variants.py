"""Kernel sources with one stage left out, for the breakdown benchmarks (a
development tool: it lives beside them, outside the installed package).

A variant is a kernel file with its ``cupyep/...`` headers inlined and text
edits applied; its results are wrong by construction, only its time matters.
Variants are written next to the real kernels (so the JIT finds them under
``cupyep/``) and removed after the run.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from cupyep import jit

Edits = List[Tuple[str, str]]  # (old, new); each old must occur exactly once

_INCLUDE = re.compile(r'^#include "cupyep/([^"]+)"\s*$', re.M)


def inline(src_dir: str, name: str, seen=None) -> str:
    """The file with every "cupyep/..." include replaced by its text, once."""
    seen = set() if seen is None else seen
    with open(os.path.join(src_dir, name)) as f:
        text = f.read().replace("#pragma once", "")

    def sub(m):
        if m.group(1) in seen:
            return ""
        seen.add(m.group(1))
        return inline(src_dir, m.group(1), seen)
    return _INCLUDE.sub(sub, text)


def variant_sources(name: str, variants: Dict[str, Edits], base_dir: Optional[str] = None) -> Dict[str, str]:
    """{row: source text}: "full" (the kernels as they are), "base" (``name``
    from base_dir, e.g. another checkout's raw_kernels/cupyep) and every
    variant. Raises ValueError if an edit's anchor is not found exactly once
    (the kernels changed under it)."""
    full = inline(os.path.join(jit.kernel_dir(), "cupyep"), name)
    texts = {"full": full}
    if base_dir:
        texts["base"] = inline(base_dir, name)
    for row, edits in variants.items():
        text = full
        for old, new in edits:
            if text.count(old) != 1:
                raise ValueError(f"variant {row}: edit anchor found {text.count(old)} times in {name}")
            text = text.replace(old, new)
        texts[row] = text
    return texts


def write_variants(name: str, variants: Dict[str, Edits], base_dir: Optional[str] = None,
                   rows: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Write the sources (all, or the rows named) beside the kernels; returns
    {row: path relative to the kernel directory}, e.g. "cupyep/breakdown_x_full.cu"."""
    stem = os.path.splitext(name)[0]
    paths = {}
    for row, text in variant_sources(name, variants, base_dir).items():
        if rows and row not in rows:
            continue
        paths[row] = f"cupyep/breakdown_{stem}_{row}.cu"
        with open(os.path.join(jit.kernel_dir(), paths[row]), "w") as f:
            f.write(text)
    jit.sources_digest.cache_clear()
    return paths


def remove_variants(paths: Dict[str, str]) -> None:
    for path in paths.values():
        try:
            os.remove(os.path.join(jit.kernel_dir(), path))
        except FileNotFoundError:
            pass


def add_args(ap) -> None:
    """--rows (only these variants) and --base (another checkout's kernels)."""
    ap.add_argument("--rows", nargs="*", default=None, help="only these variants (default: all)")
    ap.add_argument("--base", default=None, help="raw_kernels/cupyep of another checkout")


@contextlib.contextmanager
def on_disk(comm, name: str, variants: Dict[str, Edits], base_dir: Optional[str] = None,
            rows: Optional[Sequence[str]] = None):
    """Rank 0 of ``comm`` (mpi4py) writes the sources, every rank gets
    {row: path} (the kernels' digest is recomputed with them); rank 0
    removes them on exit. Collective: every rank of ``comm`` enters."""
    paths, error = None, None
    if comm.rank == 0:
        try:
            paths = write_variants(name, variants, base_dir, rows)
        except (ValueError, OSError) as e:  # raised on every rank, not only here
            error = f"{type(e).__name__}: {e}"
    paths, error = comm.bcast((paths, error), root=0)
    if error:
        raise ValueError(f"kernel variants not written: {error}")
    try:
        jit.sources_digest.cache_clear()
        yield paths
    finally:
        if comm.rank == 0 and paths:
            remove_variants(paths)
        jit.sources_digest.cache_clear()
