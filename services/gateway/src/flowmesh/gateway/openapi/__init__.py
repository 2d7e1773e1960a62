"""The gateway's OpenAPI 3.1 document: each route documents itself, the builder only assembles.

- :mod:`.operation`: :class:`~.operation.Operation`, the decorator a handler wears to say what it
  takes and answers (the route modules import only this);
- :mod:`.components`: the vocabulary every route shares (error responses, path parameters,
  header parameters, tags);
- :mod:`.document`: :func:`~.document.build_openapi`, which walks an application's router, reads
  each handler's :class:`~.operation.Operation` and adds the statuses every route of a kind has;
- ``python -m flowmesh.gateway.openapi`` prints the document of ``create_app``'s routes; ``make
  openapi`` writes it to ``docs/api/openapi.json``, which is committed (a test keeps it current).

Nothing here imports a route module or the application, so the route modules (and ``/openapi.json``
itself) can import the decorator and the builder without an import cycle.
"""
