"""Engine adapter: the standalone server on ``picows`` (Cython framing, uvloop).

The same policy core as the websockets adapter, reached differently:

- **Handshake.** A small asyncio protocol reads and screens the request head
  (size, slowloris, malformed lines: real 4xx answers), builds the
  :class:`~wsguard.core.request.HandshakeRequest` from one parse and awaits
  the Guard, which may need the store. A refusal is written as a real HTTP
  response; an admitted socket is handed to a picows protocol, fed the head,
  and upgraded by picows (``101``, with the chosen subprotocol).
- **Frames.** picows calls :class:`GuardListener` for every frame. Control
  frames and continuation frames are counted by the policy (a ping flood, a
  fragment flood is a flood) and pings answered here; fragments are assembled
  with the message size and the number of fragments checked as each one arrives
  (``1009`` as soon as a limit is crossed; picows itself refuses a single
  frame over the limit from its header, before reading the payload). No
  extension is negotiated: a reserved bit is a protocol error (``1002``), and so
  is a close frame with a code that must never be sent.
- **Messages** go through :meth:`Session.receive` in the frame callback: refusals,
  closes and plain-function handlers need no task. A coroutine handler runs in
  the connection's task (made when needed, gone when idle); messages that arrive
  while it waits queue (at most 16, then the socket stops being read), in order.

What picows cannot do is refused at config validation (``engine``):
permessage-deflate and the gateway.
"""

from __future__ import annotations

from wsguard.engines.picows.server import PicowsServer, start_server

__all__ = ["PicowsServer", "start_server"]
