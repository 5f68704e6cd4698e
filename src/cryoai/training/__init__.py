"""What the pipeline's fit needs: the gradient loop (:mod:`.trainer`), the options
(:mod:`.config`), the loss, decoder fitting, the pose encoder's training, pose prediction with
the encoder, the run directory, checkpoints and torch.distributed. The run itself is
:func:`cryoai.pipeline.run_default`.
"""
