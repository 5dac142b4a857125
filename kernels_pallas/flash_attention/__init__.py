"""Block-diffusion flash attention for GPU (Pallas/Triton): ``ops.flash_attention``."""
