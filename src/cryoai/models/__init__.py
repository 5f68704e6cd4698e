"""Models: the encoder (images -> poses), decoders (Fourier volume) and the cryoAI module."""
