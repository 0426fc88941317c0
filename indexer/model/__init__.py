"""The denoiser and what it computes: config, UNet, φ, readouts, checkpoints. torch + numpy only: no store, no sources."""
