"""File formats: MRC, RELION STAR 3.0/3.1, cryoSPARC .cs, and the one particle table.

This is the only layer that knows file conventions (degrees, RELION origin signs, 1-based
stack indices, optics groups).
"""
