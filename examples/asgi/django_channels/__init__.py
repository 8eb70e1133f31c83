"""A minimal Django Channels project behind wsguard (see ``asgi.py`` for how to run it).

- ``settings.py``: no database, an in-memory channel layer, ``channels`` installed.
- ``consumers.py``: ``EchoConsumer`` greets the wsguard subject and echoes every message.
- ``routing.py``: the WebSocket URLs (``ws/echo/``); ``urls.py``: one HTTP view.
- ``asgi.py``: ``application`` = ``WsGuardMiddleware`` around the ``ProtocolTypeRouter``.
"""
