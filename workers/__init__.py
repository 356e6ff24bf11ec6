"""The Celery side: app factory, queue topology, the job task, GPU pinning and the launcher."""
