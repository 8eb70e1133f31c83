// A tutorial-grade chat server on the `ws` package: a DELIBERATELY VULNERABLE target of
// wsguard audit's tests (tests/test_audit_unseen_servers.py). Never deploy it.
//
// Written the way WebSocket tutorials write them, and speaking its own protocol, not
// wsguard's: {"type": "ping"} is answered {"type": "pong", "timestamp": ...} (no id echo);
// every other message is broadcast to every client; errors are {"type": "error", ...}.
//
// Its real defects, each a class the scanner must find (check ids in brackets):
//
// | defect class          | what the code does                                   | found by                           |
// |-----------------------|------------------------------------------------------|------------------------------------|
// | malformed_token       | jwt.decode() returns a non-JSON payload as a string:  | auth.malformed                     |
// |                       | "JSON garbage" tokens open a connection               |                                    |
// | signature_unverified  | jwt.decode() instead of jwt.verify(): no signature  | auth.signature                     |
// | alg_none              | ... so alg "none" tokens are taken as well            | auth.alg_none                      |
// | expired_accepted      | ... and exp is never looked at                        | auth.expired                       |
// | exp_not_required      | ... nor required                                      | auth.no_exp                        |
// | outlives_token        | an open socket is never closed when its token expires | token.expiry                       |
// | no_origin_check       | any Origin (and "null") may connect                   | origin.foreign, origin.null        |
// | privileged_relayed    | {"type":"admin"} from any user is broadcast to all    | authz.privileged                   |
// | no_size_limit         | maxPayload left at ws's default (100 MiB)             | size.limit, size.frame, size.fragments |
// | no_rate_limit         | every message is processed, however many              | flood.rate_limit                   |
// | no_connection_limit   | any number of connections from one address           | conns.limit                        |
// | no_heartbeat          | no pings, no idle timeout: dead peers stay forever    | liveness.heartbeat                 |
// | stack_traces          | a parse error is answered with err.stack              | disclosure.errors                  |
// | log_injection         | raw messages and the token go to the log (stdout)     | logs.injection                     |
// | slow_handshake        | Node's default headersTimeout: 60 s of slow headers   | handshake.timeout                  |
//
// What it gets right: a request without a token is refused (401) before the upgrade, and
// ws closes invalid UTF-8 with 1007 (the `error` listener keeps the process alive).
//
// Usage: node server.js [port]  (0: any free port). Prints "listening on 127.0.0.1:PORT"
// first; every later line on stdout is the server's log.
'use strict';

const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');
const jwt = require('jsonwebtoken');

const port = Number(process.argv[2] || process.env.PORT || 8080);

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' });
  res.end('chat server\n');
});
const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  // "authentication": take the token from the Authorization header or ?token=
  const url = new URL(req.url, 'http://localhost');
  let token = url.searchParams.get('token');
  const header = req.headers['authorization'];
  if (header && header.startsWith('Bearer ')) token = header.slice(7);
  const user = token ? jwt.decode(token) : null;
  if (!user) {
    socket.write('HTTP/1.1 401 Unauthorized\r\n\r\n');
    socket.destroy();
    return;
  }
  console.log('client connected: ' + (user.sub || 'anonymous') + ' token=' + token);
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.user = user;
    wss.emit('connection', ws, req);
  });
});

wss.on('connection', (ws) => {
  ws.on('error', console.error);
  ws.on('message', (data) => {
    console.log('message from ' + ws.user.sub + ': ' + data);
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      ws.send(JSON.stringify({ type: 'error', message: err.message, stack: err.stack }));
      return;
    }
    if (msg && msg.type === 'ping') {
      ws.send(JSON.stringify({ type: 'pong', timestamp: Date.now() }));
      return;
    }
    // chat, admin, anything else: to everyone
    wss.clients.forEach((client) => {
      if (client.readyState === WebSocket.OPEN) {
        client.send(JSON.stringify({ type: 'message', from: ws.user.sub, data: msg }));
      }
    });
  });
  ws.on('close', () => console.log('client disconnected: ' + ws.user.sub));
});

server.listen(port, '127.0.0.1', () => {
  console.log('listening on 127.0.0.1:' + server.address().port);
});
