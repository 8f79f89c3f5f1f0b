"""The hand-written Stable Diffusion XL and the CoCoIns mapper. README.md gives the reading order."""
