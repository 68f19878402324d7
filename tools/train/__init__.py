"""Training the bundled models: LLaDA's masked-diffusion objective, data pipelines, and a resumable loop."""
