#!/usr/bin/env python3
"""Slow-body attack on a node's HTTP API (issue 18.1), bounded.

Starts `xe node` (API on 127.0.0.1, default limits), then from ATTACKERS
loopback source addresses (127.0.0.10, .11, ...) opens CONNS connections each
that send `POST /leases` headers and one body byte, and holds them. Meanwhile
a bystander at 127.0.0.2 asks `GET /health` every 0.2 s. Reports how many
attack connections were held / refused (503) / timed out (408), and how many
bystander requests succeeded during the attack.

    python3 bench/hostile_http.py [XE_BINARY] [ATTACKERS] [CONNS]

Only loopback; every socket is closed at the end; the node is stopped by PID.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

XE = sys.argv[1] if len(sys.argv) > 1 else "target/release/xe"
ATTACKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
CONNS = int(sys.argv[3]) if len(sys.argv) > 3 else 60
HOLD = 15.0  # seconds the attack lasts (bodies time out after 10 s)

data = tempfile.mkdtemp(prefix="xe-hostile-http-")
node = subprocess.Popen(
    [XE, "node", "--data", data, "--api-listen", "127.0.0.1:0",
     "--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    ready = json.loads(node.stdout.readline())
    host, port = ready["api_addr"].rsplit(":", 1)
    api = (host, int(port))

    def conn_from(src):
        s = socket.socket()
        s.bind((src, 0))
        s.settimeout(5)
        s.connect(api)
        return s

    held, refused, failed = [], 0, 0
    t0 = time.time()
    for a in range(ATTACKERS):
        src = f"127.0.0.{10 + a}"
        for _ in range(CONNS):
            try:
                s = conn_from(src)
                s.sendall(b"POST /leases HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
                held.append(s)
            except OSError:
                failed += 1

    ok = bad = 0
    stop = time.time() + HOLD
    while time.time() < stop:
        try:
            s = conn_from("127.0.0.2")
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                bad += 1
            s.close()
        except OSError:
            bad += 1
        time.sleep(0.2)

    # Every attack connection has its answer by now: 503 (refused at
    # once), 408 (its body never came), or none.
    timed_out = limited = 0
    for s in held:
        s.settimeout(1)
        try:
            first = s.recv(64)
        except OSError:
            first = b""
        if first.startswith(b"HTTP/1.1 408"):
            timed_out += 1
        elif first.startswith(b"HTTP/1.1 503"):
            refused += 1
        elif first.startswith(b"HTTP/1.1 429"):
            limited += 1
        s.close()
    held_count = len(held) - refused - limited
    print(json.dumps({
        "attackers": ATTACKERS, "conns_each": CONNS,
        "attack_conns_admitted": held_count, "attack_conns_refused_503": refused,
        "attack_rate_limited_429": limited,
        "attack_connect_failed": failed, "attack_bodies_408": timed_out,
        "bystander_health_ok": ok, "bystander_health_failed": bad,
        "seconds": round(time.time() - t0, 1),
    }))
finally:
    os.kill(node.pid, signal.SIGTERM)
    node.wait(timeout=30)
