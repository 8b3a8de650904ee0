"""The service behind the proxy in the tests: a Python http.server that counts its calls.

POST <any path>   counts a call per (X-User, Idempotency-Key), sleeps X-Delay seconds, answers
                  201 with {"key", "principal", "call", "echo"}; /flaky answers 500 on a key's
                  first call, /refuse answers 422
GET /calls        the counts, as {"<principal>|<key>": n}
Listens on the port given as its argument (default: any free one) and prints its port on the
first line of stdout.
"""
import http.server
import sys
import json
import threading
import time

calls = {}
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/calls":
            with lock:
                body = json.dumps(calls).encode()
            self.reply(200, body)
        else:
            self.reply(200, json.dumps({"path": self.path}).encode())

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("content-length") or 0))
        principal = self.headers.get("x-user", "")
        key = self.headers.get("idempotency-key", "")
        with lock:
            n = calls.get(f"{principal}|{key}", 0) + 1
            calls[f"{principal}|{key}"] = n
        time.sleep(float(self.headers.get("x-delay", "0")))
        if self.path == "/flaky" and n == 1:
            return self.reply(500, b'{"error": "try again"}')
        if self.path == "/refuse":
            return self.reply(422, b'{"error": "the amount is negative"}')
        body = {"key": key, "principal": principal, "call": n, "echo": data.decode()}
        self.reply(201, json.dumps(body).encode())


port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
