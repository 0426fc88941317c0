"""Training the denoiser, its denoising evaluation, fitting readouts."""
