"""Build hook for the optional C helpers of the matcher (everything else is in pyproject.toml).

``ruletag.rules._native`` is built with the machine's C compiler when one is there; if
the build fails the install goes on and ruletag runs its pure-Python reference path
(``ruletag.rules.native`` picks whichever is importable).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ruletag.rules._native",
            ["plugin/ruletag/rules/_native.c", "plugin/ruletag/rules/_jsonpack.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
