"""skyscript-build: build SkyScript-style remote-sensing image-text datasets.

Stages (one module each), data flowing one way through files:
extract -> plan -> fetch -> caption -> filter. See docs/architecture.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
