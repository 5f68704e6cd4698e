"""Pure torch physics: FFTs, grids, rotations, CTF, slicing, shifts, masks, FSC.

No file formats, no ``nn.Parameter``. Every function follows the device and dtype of its
inputs. Conventions are in CONVENTIONS.md at the repository root.
"""
