"""The run of ``cryoai train``: its stages (:mod:`.trainer`), options (:mod:`.config`), loss,
decoder fitting, pose prediction with the encoder, run directory, checkpoints and
torch.distributed.
"""
