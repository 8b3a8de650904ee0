"""The service of `idemgate chaos --bridge`: a Python service that applies POSTed events to a
SQLite ledger, one row per application.

    python3 bridge_service.py DB PORT MODE

MODE naive: every request is applied.
MODE keyed: the request's Idempotency-Key is recorded in the transaction of the effect, and a
key seen before gets the first answer without a second effect: what any service can do with
the key the bridge and the proxy hand it, so a kill between its commit and its answer does not
apply the event twice when the request comes again.

Prints "ready" once it listens.
"""
import http.server
import json
import sqlite3
import sys
import threading
import time

db_path, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
local = threading.local()


def connection():
    c = getattr(local, "c", None)
    if c is None:
        c = sqlite3.connect(db_path, timeout=60, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        local.c = c
    return c


setup = connection()
setup.execute(
    "CREATE TABLE IF NOT EXISTS effects"
    " (n INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL, amount INTEGER NOT NULL)"
)
setup.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")


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
        self.reply(200, b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        event = json.loads(body)
        key = self.headers.get("idempotency-key", "")
        c = connection()
        time.sleep(0.002)
        c.execute("BEGIN IMMEDIATE")
        try:
            if mode == "keyed":
                row = c.execute("SELECT answer FROM keys WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    c.execute("ROLLBACK")
                    return self.reply(200, row[0].encode())
            c.execute(
                "INSERT INTO effects (event, amount) VALUES (?, ?)",
                (event["id"], event["amount"]),
            )
            answer = json.dumps({"applied": event["id"]})
            if mode == "keyed":
                c.execute("INSERT INTO keys (key, answer) VALUES (?, ?)", (key, answer))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        # between the commit and the answer: a kill here keeps the effect and loses the answer
        time.sleep(0.002)
        self.reply(201, answer.encode())


server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("ready", flush=True)
server.serve_forever()
