"""Native extensions of the package (built by `pip install`, no manual step).

Project metadata lives in pyproject.toml; this file only declares compiled code.
"""
from setuptools import setup

setup(ext_modules=[])
