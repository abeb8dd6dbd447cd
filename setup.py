"""The one compiled part of drbot; everything else is in pyproject.toml.

The fingerprint's per-row loop (drbot/engines/postgres/_rowsum.c) needs a C compiler, Python's
headers and xxhash.h (Debian: libxxhash-dev, header only: nothing is linked). It is optional:
without them drbot installs and runs the same, reading archives in Python, about half as fast
for a logical backup.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "drbot.engines.postgres._rowsum",
            ["drbot/engines/postgres/_rowsum.c"],
            # No debug info: it records the build directory, and image.sh builds in a fresh
            # temporary one, so the wheel (and Docker's cached layer) would change every time.
            extra_compile_args=["-O2", "-g0"],
            optional=True,
        )
    ]
)
