"""An independent upstream for the congestion tests: plain sockets and native threads.

Run as a subprocess (``python tests/ws_peer.py HEARTBEAT_S``), never under gevent, so it
can do what the in-process simulator cannot: stop reading its socket entirely, write a
backlog of hundreds of thousands of requests in one ``sendall`` (its heartbeats queued
behind them in the byte stream), and cut a connection after taking exactly what its
kernel had acknowledged (``shutdown(SHUT_RD)`` stops window updates, the receive queue is
drained, then a reset). It prints ``PORT n`` and then obeys one command per stdin line,
answering each with one JSON line:

  pad N             requests carry an N-byte ``note`` (echoed in replies: big replies)
  days N            request dates spread over N distinct days up to 2021-01-04
  send N            write N requests in one sendall on the current connection (in the
                    background: the answer comes at once)
  rate N            N requests/s on the current connection (0 stops)
  stop_reading      stop reading the socket (our replies back up into TCP buffers)
  resume_reading
  pause_beats / resume_beats
  cut               take what the kernel acknowledged (SHUT_RD, drain), then reset
  report            {"connections", "sent", "answered", "unanswered", "duplicates", ...}
  quit
"""

import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEARTBEAT = b'{"type":"heartbeat"}'
FIRST_DAY = 18631  # 2021-01-04 as days since the epoch


def server_frame(payload, opcode=0x1):
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def unmask(mask, data):
    n = len(data)
    key = mask * (n // 4) + mask[:n % 4]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Conn:
    def __init__(self, number, sock):
        self.number, self.sock = number, sock
        self.send_lock = threading.Lock()
        self.dead = False
        self.buf = bytearray()

    def send(self, data):
        with self.send_lock:
            if self.dead:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.dead = True
                return False


class Peer:
    def __init__(self, heartbeat_s):
        self.heartbeat_s = heartbeat_s
        self.lock = threading.Lock()
        self.conn = None
        self.connections = 0
        self.reading = threading.Event()
        self.reading.set()
        self.beats = True
        self.pad = 0
        self.days = 1
        self.rate = 0
        self.next_id = 1
        self.sent = 0
        self.answered = set()
        self.duplicates = 0
        self.replies = 0
        self.client_heartbeats = 0
        self.client_closes = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a small receive buffer: what the peer's kernel acknowledges without the peer
        # reading stays small, so a stalled reader backs our bytes up into the client's
        # send queue (where SIOCOUTQ sees them)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)

    # -- connections -------------------------------------------------------------------

    def accept_loop(self):
        while True:
            sock, _ = self.listener.accept()
            try:
                self.handshake(sock)
            except (OSError, ValueError):
                sock.close()
                continue
            with self.lock:
                self.connections += 1
                conn = self.conn = Conn(self.connections, sock)
            threading.Thread(target=self.read_loop, args=(conn,), daemon=True).start()
            threading.Thread(target=self.beat_loop, args=(conn,), daemon=True).start()

    def handshake(self, sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ValueError("closed during the handshake")
            data += chunk
        key = next(line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def beat_loop(self, conn):
        due = time.monotonic()
        while not conn.dead:
            if self.beats and not conn.send(server_frame(HEARTBEAT)):
                return
            due += self.heartbeat_s
            time.sleep(max(0.0, due - time.monotonic()))

    def read_loop(self, conn):
        while not conn.dead:
            self.reading.wait()
            try:
                data = conn.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                conn.dead = True
                return
            self.take(conn, data)

    def take(self, conn, data):
        buf = conn.buf
        buf += data
        pos = 0
        while True:
            if len(buf) - pos < 2:
                break
            second = buf[pos + 1]
            n, head = second & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + 4 + n:
                break
            opcode = buf[pos] & 0x0F
            mask = bytes(buf[pos + head:pos + head + 4])
            payload = unmask(mask, bytes(buf[pos + head + 4:pos + head + 4 + n]))
            pos += head + 4 + n
            self.on_frame(conn, opcode, payload)
        del buf[:pos]

    def on_frame(self, conn, opcode, payload):
        if opcode == 0x8:  # answer the closing handshake, then end the connection
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.client_closes.append(code)
            conn.send(server_frame(payload[:2], opcode=0x8))
            conn.dead = True
            return
        if opcode != 0x1:
            return
        if payload == HEARTBEAT:
            self.client_heartbeats += 1
            return
        message = json.loads(payload)
        rid = message.get("id")
        with self.lock:
            self.replies += 1
            if rid in self.answered:
                self.duplicates += 1
            self.answered.add(rid)

    # -- requests --------------------------------------------------------------------

    def requests(self, n):
        note = "x" * self.pad
        frames = []
        with self.lock:
            first = self.next_id
            self.next_id += n
        for rid in range(first, first + n):
            day = time.strftime("%Y-%m-%d", time.gmtime((FIRST_DAY - rid % self.days) * 86400))
            payload = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
                       "currency": "USD", "date": day + "T21:32:42.324Z"}
            if note:
                payload["note"] = note
            frames.append(server_frame(json.dumps(
                {"type": "message", "id": rid, "payload": payload},
                separators=(",", ":")).encode()))
        return b"".join(frames), n

    def send_requests(self, n):
        conn = self.conn
        data, n = self.requests(n)
        if conn is not None and conn.send(data):
            with self.lock:
                self.sent += n
            return n
        return 0

    def rate_loop(self):
        while True:
            time.sleep(0.01)
            if self.rate:
                self.send_requests(max(1, int(self.rate / 100)))

    def cut(self):
        """Take what our kernel acknowledged, then reset the connection."""
        conn = self.conn
        # nothing we send may reopen the client's window (a sender blocked for long on a
        # full socket sends nothing either)
        locked = conn.send_lock.acquire(timeout=1.0)
        try:
            conn.dead = True
            sock = conn.sock
            sock.shutdown(socket.SHUT_RD)  # no window updates from here on
            sock.setblocking(False)
            while True:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    break
                self.take(conn, data)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        finally:
            if locked:
                conn.send_lock.release()

    def report(self):
        with self.lock:
            sent_ids = set(range(1, self.next_id))
            return {"connections": self.connections, "sent": self.sent,
                    "replies": self.replies, "answered": len(self.answered),
                    "unanswered": len(sent_ids - self.answered),
                    "duplicates": self.duplicates,
                    "client_heartbeats": self.client_heartbeats,
                    "client_closes": self.client_closes,
                    "connected": int(self.conn is not None and not self.conn.dead)}


def main():
    peer = Peer(float(sys.argv[1]))
    threading.Thread(target=peer.accept_loop, daemon=True).start()
    threading.Thread(target=peer.rate_loop, daemon=True).start()
    print("PORT", peer.listener.getsockname()[1], flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        answer = {"ok": True}
        if command == "pad":
            peer.pad = int(arg)
        elif command == "days":
            peer.days = int(arg)
        elif command == "send":  # in the background: a big one blocks until read
            threading.Thread(target=peer.send_requests, args=(int(arg),), daemon=True).start()
        elif command == "rate":
            peer.rate = float(arg)
        elif command == "stop_reading":
            peer.reading.clear()
        elif command == "resume_reading":
            peer.reading.set()
        elif command == "pause_beats":
            peer.beats = False
        elif command == "resume_beats":
            peer.beats = True
        elif command == "cut":
            peer.cut()
        elif command == "report":
            answer = peer.report()
        elif command == "quit":
            break
        print(json.dumps(answer), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
