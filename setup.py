"""Build script: everything declarative lives in pyproject.toml; this file only adds the Cython extensions.

Every `nodeproxy/_*.pyx` is one native module with one job (the relay core, each codec, ...); each
has a `.pxd` beside it for cimports and a `.pyi` stub for the Python side.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_SOURCES = sorted(Path("nodeproxy").glob("_*.pyx"))
# NP_NATIVE_ONLY=_fastpath,_h1 rebuilds just those modules (a developer iterating on one of them).
if only := os.environ.get("NP_NATIVE_ONLY"):
    NATIVE_SOURCES = [s for s in NATIVE_SOURCES if s.stem in only.split(",")]
# Modules that link a C library name it here (module name -> libraries).
LIBRARIES: dict[str, list[str]] = {"_h2": ["nghttp2"], "_tunnel": ["ssl", "crypto", "nghttp2"]}

extensions = [
    Extension(
        f"nodeproxy.{source.stem}",
        [str(source)],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
        libraries=LIBRARIES.get(source.stem, []),
    )
    for source in NATIVE_SOURCES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
