"""Build the objcache Cython extensions.

Build modes (environment):
  OBJCACHE_DEV=1    -Wall -Wextra -Werror for C, Cython warnings as errors.
  OBJCACHE_DEBUG=1  -O0 -g, and live-object counters (OBJCACHE_DEBUG macro)
                    that tests assert return to zero.
  default           release: -O2, lenient warnings.
"""
import os
import shlex
import subprocess

from setuptools import Extension, setup

DEV = os.environ.get("OBJCACHE_DEV") == "1"
DEBUG = os.environ.get("OBJCACHE_DEBUG") == "1"


def pkg_config(package):
    """(include_dirs, library_dirs, libraries) for a pkg-config package."""
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags", "--libs", package],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"pkg-config could not find {package!r} ({exc}); install the system "
            "packages first: scripts/install-system-deps.sh"
        ) from exc
    inc, libdirs, libs = [], [], []
    for tok in shlex.split(out):
        if tok.startswith("-I"):
            inc.append(tok[2:])
        elif tok.startswith("-L"):
            libdirs.append(tok[2:])
        elif tok.startswith("-l"):
            libs.append(tok[2:])
    return inc, libdirs, libs


def extensions():
    cflags = ["-std=gnu11", "-fno-strict-aliasing"]
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        cflags += ["-O0", "-g3"]
        macros.append(("OBJCACHE_DEBUG", "1"))
    else:
        cflags += ["-O3"]
    if DEV:
        # Cython's generated code trips -Wunused-function and a few
        # -Wextra checks that are not ours; those stay warnings-off.
        cflags += ["-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                   "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

    uring_inc, uring_libdirs, uring_libs = pkg_config("liburing")

    common = dict(include_dirs=["src"], define_macros=macros,
                  extra_compile_args=cflags)
    exts = [
        Extension("objcache._ext._hashing",
                  ["objcache/_ext/_hashing.pyx", "src/crc32c.c"],
                  depends=["src/crc32c.h", "src/oc_debug.h"], **common),
        Extension("objcache._ext._pages",
                  ["objcache/_ext/_pages.pyx"],
                  depends=["src/oc_debug.h"], **common),
        Extension("objcache._ext._logwriter",
                  ["objcache/_ext/_logwriter.pyx", "src/uring_log.c"],
                  depends=["src/uring_log.h", "src/oc_debug.h"],
                  include_dirs=["src"] + uring_inc,
                  library_dirs=uring_libdirs, libraries=uring_libs,
                  define_macros=macros, extra_compile_args=cflags),
    ]
    # OBJCACHE_ONLY=_pages,_hashing builds a subset (handy while iterating on
    # one module; a full build is the default).
    only = [m for m in os.environ.get("OBJCACHE_ONLY", "").split(",") if m]
    if only:
        exts = [e for e in exts if e.name.rsplit(".", 1)[1] in only]
    return exts


def cythonized():
    from Cython.Build import cythonize
    from Cython.Compiler import Options

    if DEV:
        Options.warning_errors = True
    return cythonize(
        extensions(),
        language_level=3,
        compiler_directives={
            "embedsignature": True,
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "warn.unused_arg": False,
            "warn.maybe_uninitialized": DEV,
            "warn.unused": DEV,
            "warn.unused_result": DEV,
        },
        # Dev/debug builds must not reuse a release build's C files.
        force=DEV or DEBUG,
    )


setup(ext_modules=cythonized())
