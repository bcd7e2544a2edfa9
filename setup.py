"""Build script: everything declarative lives in pyproject.toml; this file only adds the Cython extension."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "nodeproxy._fastpath",
        ["nodeproxy/_fastpath.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
