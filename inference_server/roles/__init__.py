"""Composition roots: where each long-running role's objects are built from Settings, and nowhere
else.

- ``api``: :func:`api.app.create_app` (database, registry, storage, relay, broker probe, waiter).
- ``worker``: :func:`workers.launcher.build_worker` in the worker process (Celery app, queues, job
  task) and :mod:`workers.child` in its child (engine, storage, database of the JobRunner).
- ``dispatcher``: :func:`inference_server.roles.dispatcher.start_dispatcher` (relay and webhook
  delivery).
- ``ingress``: :func:`inference_server.roles.ingress.run_ingress` (AMQP consumer, relay, probes).
- ``up``: :mod:`inference_server.roles.up`, the three above in one process on embedded defaults.
"""
