"""Build hook only (everything else is declared in setup.cfg): ship the imagery catalog's data
file, ``image_sources.yaml``, beside the top-level module ``image_sources.py`` that reads it.

setuptools installs package data only inside packages; ``image_sources`` is a top-level module,
so its data file is copied into the build here.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CATALOG = "image_sources.yaml"


class BuildPyWithCatalog(build_py):
    """``build_py`` that also copies ``image_sources.yaml`` beside ``image_sources.py``."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads it from the source tree
            self.copy_file(CATALOG, str(Path(self.build_lib) / CATALOG))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / CATALOG)]


setup(cmdclass={"build_py": BuildPyWithCatalog})
