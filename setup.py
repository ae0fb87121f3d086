"""Declares the native extension; everything else is in pyproject.toml.

TAMMA_EVENTS_NO_EXT=1 skips the extension (the package then runs on the pure-Python codec);
TAMMA_EVENTS_CYTHON_ANNOTATE=1 writes Cython's HTML annotation next to the sources;
TAMMA_EVENTS_DEBUG=1 builds without optimisation and with bounds checks;
TAMMA_EVENTS_OPENSSL=0 builds without libcrypto (the hash chain then goes through hashlib, the
same SHA-256, slower); by default libcrypto is used where its headers are found.
Where the extension cannot be compiled the install continues without it, with a notice.
"""

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("TAMMA_EVENTS_DEBUG") == "1"


class OptionalBuildExt(build_ext):
    """Build the codec if possible; otherwise fall back to the pure-Python reference."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, ...
            self._notice(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._notice(exc)

    @staticmethod
    def _notice(exc):
        print(
            f"tamma-events: the native codec could not be built ({exc}); "
            "installing the pure-Python codec instead.",
            file=sys.stderr,
        )


def have_libcrypto():
    """Whether a program using OpenSSL's EVP digests compiles and links here."""
    if os.environ.get("TAMMA_EVENTS_OPENSSL", "auto") == "0":
        return False
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <openssl/evp.h>\nint main(void) { return EVP_MD_CTX_new() == 0; }\n")
        try:
            objects = compiler.compile([source], output_dir=tmp)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), libraries=["crypto"])
        except Exception:
            return False
    return True


def extensions():
    if os.environ.get("TAMMA_EVENTS_NO_EXT") == "1":
        return []
    compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
    if sys.platform == "win32":
        compile_args = []
    options = {"extra_compile_args": compile_args, "include_dirs": ["ext"]}
    if have_libcrypto():
        options.update(define_macros=[("TAMMA_HAVE_OPENSSL", "1")], libraries=["crypto"])
    pyx = os.path.join("ext", "_native.pyx")
    c_file = os.path.join("ext", "_native.c")
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is None or not os.path.exists(pyx):
        # An sdist ships the generated C, so users without Cython can still build.
        if not os.path.exists(c_file):
            return []
        return [Extension("tamma_events._native", [c_file], **options)]
    directives = {"language_level": "3"}
    if DEBUG:
        directives.update(boundscheck=True, wraparound=True)
    return cythonize(
        [Extension("tamma_events._native", [pyx], **options)],
        compiler_directives=directives,
        annotate=os.environ.get("TAMMA_EVENTS_CYTHON_ANNOTATE") == "1",
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
