"""skyscript-build: build SkyScript-style remote-sensing image-text datasets.

Stages (one package each, ``skyscript_build/<stage>/stage.py`` holding its config, result and
``run_<stage>``), data flowing one way through files: extract -> plan -> fetch -> caption ->
filter. See docs/architecture.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
