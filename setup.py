"""Build hook for the optional C helpers (everything else is in pyproject.toml).

``ruletag.rules._native`` (the matcher's) and ``ruletag.protocol._wire`` (the entry
scanner's) are built with the machine's C compiler when one is there; if a build fails the
install goes on and ruletag runs its pure-Python reference path (``ruletag.rules.native`` and
``ruletag.protocol.entries`` pick whichever is importable).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ruletag.rules._native",
            ["plugin/ruletag/rules/_native.c", "plugin/ruletag/rules/_jsonpack.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "ruletag.protocol._wire",
            ["plugin/ruletag/protocol/_wire.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ]
)
