"""The engine: the diffusers side. Pipeline loading and caching, LoRA, DFloat11, generation.

It imports torch and diffusers and runs only in worker processes. What the torch-free API shares
with it (the model registry) lives in :mod:`inference_server.registry`.
"""
