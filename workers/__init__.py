"""The Celery side: the worker's composition root (launcher.py, child.py), the app factory, the job
task and its runner, GPU pinning, and the one-worker-per-GPU supervisor (gpus.py)."""
