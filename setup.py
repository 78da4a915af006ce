"""Only here to hook the cffi build of runtime._syscalls into setuptools."""

from setuptools import setup

setup(cffi_modules=["runtime/_build_syscalls.py:ffibuilder"])
