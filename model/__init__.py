"""The hand-written Stable Diffusion XL and the CoCoIns mapper. README.md gives the reading order."""

# This project's version: recorded in every mapper and embedding file it writes (model/export.py).
__version__ = "0.1.0"
