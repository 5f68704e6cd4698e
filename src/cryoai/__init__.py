"""cryoai: amortized ab initio cryo-EM reconstruction (cryoAI) and the tools around it."""

__version__ = "0.1.0"
