#!/usr/bin/env python3
"""Side by side: xe vs OpenSSH (issue 9, first part).

One command, loopback only, bounded in time, stops only what it started:

    python3 bench/side_by_side.py            # defaults: 20 connects, 3-5 bulk runs of 1 GiB
    python3 bench/side_by_side.py --quick    # smoke test: 3 connects, 1 run of 64 MiB
    XE_BIN=/tmp/xe-old python3 bench/side_by_side.py --paths 3,4   # A/B: another build of xe

Paths measured (same client options on every path: KexAlgorithms
curve25519-sha256, Ciphers aes128-gcm@openssh.com, ControlMaster no; the
client->gateway hop of path 3 uses --gw-cipher, default the same):
  1 direct   ssh to a private sshd on 127.0.0.1
  2 bastion  ssh -J through a second private sshd (OpenSSH bastion)
  3 xe -W    ProxyCommand ssh -W through the xe gateway -> overlay -> provider (sshd backend)
  4 xe tun   `xe tunnel` (HTTP upgrade) on a local port, plain ssh to it
  5 relayed  as 3, but the provider and the gateway are each behind a NAT router
             (network namespaces, 198.18.0.0/15) and reach each other through a relay node;
             checked to stay relayed (root, ip, iptables)
  6 socat    plain TCP relay in front of the direct sshd (the floor)
  7 xe stdio as 4, but `xe tunnel --stdio` is ssh's ProxyCommand (what `xe ssh --http`
             runs): pipes to ssh instead of a local TCP port; its CPU is read with bash's `times`
  8 socat×3 three socat relays in a row in front of the direct sshd: the floor for any
             path with three relaying processes (paths 4 and 7: xe tunnel, gateway, provider)
  9 bastion+ ssh -J through the bastion, whose hop to the target goes through path 6's socat:
             path 3's shape (ssh -W, a hop that ends SSH, one more relay) with OpenSSH and socat
 10 xe p2p   `xe tunnel --p2p --stdio` as ssh's ProxyCommand, told the provider's peer and
             address (what `xe ssh --p2p` runs): the consumer's own libp2p host dials the
             provider, no gateway in the path; its CPU is read with bash's `times`

Bulk: `head -c 1G /dev/zero | ssh HOST 'cat > /dev/null'` (up) and
`ssh HOST 'head -c 1G /dev/zero' | wc -c` (down; wc checks the byte count),
rounds of every path x both directions until --runs, then more rounds up to
--max-runs while --budget allows. Integrity: a random file (64 MiB) uploaded
and downloaded once per path, sha256 compared. xe gateway / provider CPU:
utime+stime from /proc/PID/stat before and after each transfer.

Requires: root (the sshd backend and VM user are root), /usr/sbin/sshd,
ssh, ssh-keygen, socat, and target/release/xe (cargo build --release -p xe).
"""

import argparse
import hashlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XE_BIN lets an A/B run compare two builds of xe with the same harness.
XE = os.environ.get("XE_BIN") or os.path.join(ROOT, "target", "release", "xe")
SSHD = "/usr/sbin/sshd"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30

STARTED = []  # Popen objects we started (and only these are stopped)
SOCAT_CHAIN_PORT = [1]  # the first of path 8's three chained socats


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    STARTED.append(p)
    return p


def stop_all():
    stop_processes()
    for ns in reversed(NAMESPACES):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    NAMESPACES.clear()


def stop_processes():
    # Only the processes this script started, by PID, newest first.
    for p in reversed(STARTED):
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in reversed(STARTED):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def run(cmd, timeout=60, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    return r


def wait_port(port, timeout=15):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # fields 14 (utime), 15 (stime); rest[0] is field 3
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


NAMESPACES = []  # network namespaces this script created (and only these are deleted)


def relay_topology():
    """Path 5's network, as in tests/tests/common/netns.rs: a public segment
    (198.18.1.0/24 towards the provider's site, 198.18.2.0/24 towards the
    gateway's) holding the relay node, and two sites behind their own
    MASQUERADE routers (198.18.11.0/24 provider, 198.18.12.0/24 gateway).
    Nothing outside 198.18.0.0/15; nothing left behind (see stop_all)."""
    tag = f"xeb{os.getpid() % 100000}"
    pub, rp, p, rg, g = (f"{tag}-{x}" for x in ("pub", "rp", "p", "rg", "g"))
    for ns in (pub, rp, p, rg, g):
        run(["ip", "netns", "add", ns])
        NAMESPACES.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", pub, "link", "add", "rp", "type", "veth", "peer", "name", "wan", "netns", rp])
    run(["ip", "-n", pub, "link", "add", "rg", "type", "veth", "peer", "name", "wan", "netns", rg])
    run(["ip", "-n", rp, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", p])
    run(["ip", "-n", rg, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", g])
    for dev, addr in (("rp", "198.18.1.1/24"), ("rg", "198.18.2.1/24")):
        run(["ip", "-n", pub, "addr", "add", addr, "dev", dev])
        run(["ip", "-n", pub, "link", "set", dev, "up"])
    for r, wan, lan, gw in ((rp, "198.18.1.2/24", "198.18.11.1/24", "198.18.1.1"),
                            (rg, "198.18.2.2/24", "198.18.12.1/24", "198.18.2.1")):
        run(["ip", "-n", r, "addr", "add", wan, "dev", "wan"])
        run(["ip", "-n", r, "link", "set", "wan", "up"])
        run(["ip", "-n", r, "addr", "add", lan, "dev", "lan"])
        run(["ip", "-n", r, "link", "set", "lan", "up"])
        run(["ip", "-n", r, "route", "add", "default", "via", gw])
        ipt = ["ip", "netns", "exec", r, "iptables"]
        run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run(ipt + ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", "--random-fully"])
        run(ipt + ["-P", "FORWARD", "DROP"])
        run(ipt + ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"])
        run(ipt + ["-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate",
                   "ESTABLISHED,RELATED", "-j", "ACCEPT"])
    for h, addr, gw in ((p, "198.18.11.2/24", "198.18.11.1"), (g, "198.18.12.2/24", "198.18.12.1")):
        run(["ip", "-n", h, "addr", "add", addr, "dev", "eth0"])
        run(["ip", "-n", h, "link", "set", "eth0", "up"])
        run(["ip", "-n", h, "route", "add", "default", "via", gw])
    return dict(pub=pub, p=p, g=g)


def http_get_in(ns, url, timeout=40):
    """GET `url` from inside namespace `ns` (the node's API listens on that
    namespace's loopback)."""
    code = "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],timeout=35).read().decode())"
    return run(["ip", "netns", "exec", ns, sys.executable, "-c", code, url], timeout=timeout).stdout.decode()


class Node:
    """An `xe node` process; its first stdout line is the JSON ready line.
    With `ns`, it runs in that network namespace (`ip netns exec` execs, so
    the PID is the node's own)."""

    def __init__(self, data, args, ns=None, listen="/ip4/127.0.0.1/tcp/0"):
        os.makedirs(data, exist_ok=True)
        self.logf = open(os.path.join(data, "node.log"), "wb")
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        pre = ["ip", "netns", "exec", ns] if ns else []
        listens = []
        for ad in [listen] if isinstance(listen, str) else listen:
            listens += ["--p2p-listen", ad]
        self.p = start(pre + [XE, "node", "--data", data] + listens + args,
                       stdout=subprocess.PIPE, stderr=self.logf, env=env)
        self.lines = []
        self.cond = threading.Condition()

        def drain():
            for l in self.p.stdout:  # keep draining so the node never blocks
                with self.cond:
                    self.lines.append(l)
                    self.cond.notify_all()
        threading.Thread(target=drain, daemon=True).start()
        self.ready = self.wait_line(lambda j: j.get("event") == "ready", 60, f"xe node {args} ready")

    def wait_line(self, pred, timeout, what):
        """The first stdout JSON line for which `pred` holds."""
        end = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for l in self.lines[seen:]:
                    try:
                        j = json.loads(l)
                    except ValueError:
                        continue
                    if pred(j):
                        return j
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"{what}: not within {timeout} s (log {self.logf.name})")
                self.cond.wait(left)

    @property
    def pid(self):
        return self.p.pid


SSHD_PIDS = {}  # name -> PID of the private sshd this script started


def tree(pid):
    """`pid` and all its descendants (from /proc)."""
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def memory_kib(pids):
    """Summed (RSS, PSS) in KiB over `pids` (gone processes count 0)."""
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for l in f:
                    if l.startswith("Rss:"):
                        rss += int(l.split()[1])
                    elif l.startswith("Pss:"):
                        pss += int(l.split()[1])
        except OSError:
            pass
    return rss, pss


def idle_sessions(cfg, env, host, n, measure):
    """Open `n` idle sessions to `host` (each waits on `echo up; sleep`) and
    return the memory `measure()` reads with them open minus without."""
    before = measure()
    procs = []
    try:
        # One at a time: sshd's MaxStartups (10 by default, as on the VM's
        # sshd) would drop handshakes started all at once.
        for _ in range(n):
            pr = start(["ssh", "-F", cfg, host, "echo up; exec sleep 300"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
            procs.append(pr)
            if pr.stdout.readline().strip() != b"up":  # printed once the session is open
                pr.wait(timeout=30)
                raise RuntimeError(f"idle session to {host} did not come up: "
                                   f"{pr.stderr.read().decode(errors='replace')[-300:]}")
        held = measure()
    finally:
        for pr in procs:
            if pr.poll() is None:
                os.kill(pr.pid, signal.SIGTERM)
            pr.wait(timeout=10)
    return [(h - b) / n for h, b in zip(held, before)]


def sshd(d, name, port, authorized, extra=""):
    hk = os.path.join(d, f"{name}_host_ed25519")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hk])
    cfg = os.path.join(d, f"{name}_sshd_config")
    with open(cfg, "w") as f:
        f.write(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {hk}
PidFile {d}/{name}.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
MaxStartups 100:30:200
AllowTcpForwarding yes
Subsystem sftp internal-sftp
{extra}""")
    logf = open(os.path.join(d, f"{name}_sshd.log"), "wb")
    SSHD_PIDS[name] = start([SSHD, "-D", "-e", "-f", cfg], stdout=logf, stderr=logf).pid
    wait_port(port)
    with open(hk + ".pub") as f:
        return " ".join(f.read().split()[:2])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3, help="bulk runs per path and direction (minimum)")
    ap.add_argument("--max-runs", type=int, default=5, help="extra runs while the time budget allows")
    ap.add_argument("--bytes", type=int, default=GIB)
    ap.add_argument("--check-bytes", type=int, default=64 << 20, help="random file for the sha256 check")
    ap.add_argument("--budget", type=float, default=780, help="seconds after which no extra bulk round starts")
    ap.add_argument("--transfer-timeout", type=float, default=120)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gw-cipher", default="aes128-gcm@openssh.com",
                    help="cipher for the client->xe gateway hop of path 3")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-xe", action="store_true", help="OpenSSH and socat paths only (debugging)")
    ap.add_argument("--idle", type=int, default=20,
                    help="idle sessions opened at once to measure memory per session (0 = skip)")
    ap.add_argument("--paths", default="", help="comma-separated path numbers to measure (default: all)")
    ap.add_argument("--quic", action="store_true",
                    help="gateway and provider listen on TCP and QUIC, as `xe node` does by default "
                         "(otherwise TCP only); the report says which one carried the tunnels")
    a = ap.parse_args()
    if a.quick:
        a.connects, a.runs, a.max_runs, a.bytes, a.check_bytes = 3, 1, 1, 64 << 20, 4 << 20
    if os.geteuid() != 0:
        sys.exit("run as root (the sshd backend and the VM user are root)")
    if not a.no_xe and not os.access(XE, os.X_OK):
        sys.exit(f"{XE} missing: cargo build --release -p xe")

    t_start = time.monotonic()
    d = tempfile.mkdtemp(prefix="xe-bench-")
    os.chmod(d, 0o755)
    log(f"workdir {d}")

    def on_signal(sig, _frm):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return bench(a, d, t_start)
    finally:
        stop_all()
        if not a.keep:
            subprocess.run(["rm", "-rf", d])


def setup_relayed(d, wallet):
    """Path 5: provider and gateway each behind NAT, a relay between them.
    Returns what bench_paths needs, or raises with the reason."""
    log("path 5: network namespaces; relay, provider and gateway behind NAT")
    t = relay_topology()
    relay = Node(os.path.join(d, "relay5"), ["--relay-server"], ns=t["pub"],
                 listen=["/ip4/198.18.1.1/tcp/0", "/ip4/198.18.2.1/tcp/0"])

    def facing(ip):
        for ad in relay.ready["p2p_addrs"]:
            if f"/ip4/{ip}/" in ad:
                return ad
        raise RuntimeError(f"relay has no address on {ip}: {relay.ready['p2p_addrs']}")
    prov = Node(os.path.join(d, "prov5"), ["--provide", "--vm-backend", "sshd", "--behind-nat",
                                           "--bootstrap", facing("198.18.1.1")],
                ns=t["p"], listen="/ip4/198.18.11.2/tcp/0")
    prov.wait_line(lambda j: j.get("event") == "nat" and j.get("relay_addrs"), 90,
                   "provider's relay reservation")
    gw = Node(os.path.join(d, "gw5"), ["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
                                       "--no-relay-server", "--bootstrap", facing("198.18.2.1")],
              ns=t["g"], listen="/ip4/198.18.12.2/tcp/0")
    url = f"http://{gw.ready['api_addr']}"
    r = run(["ip", "netns", "exec", t["g"], XE, "lease", "create", "--wallet", wallet, "--node", url,
             "--provider", prov.ready["account"], "--wait", "--timeout", "90"], timeout=120)
    lease = r.stdout.decode().strip().splitlines()[-1].strip()
    vm_hk = ""
    for _ in range(3):
        body = json.loads(http_get_in(t["g"], f"{url}/leases/{lease}?wait=20&since=created"))
        if body.get("state") == "accepted":
            vm_hk = body["vm_host_key"]
            break
    assert vm_hk.startswith("ssh-ed25519 "), f"path 5 vm host key: {vm_hk!r}"
    log(f"path 5: lease {lease} accepted")
    return dict(ns_g=t["g"], gw=gw, prov=prov, relay=relay, url=url, lease=lease, vm_hk=vm_hk,
                gw_port=int(gw.ready["ssh_addr"].rsplit(":", 1)[1]))


def gw_transports(xe):
    """The transports ("tcp", "quic-v1") of the gateway's connections to the provider."""
    with urllib.request.urlopen(f"http://{xe['gw'].ready['api_addr']}/node", timeout=10) as resp:
        node = json.load(resp)
    pid = xe["prov"].ready["peer_id"]
    addrs = [ad for p in node.get("peers", []) if p.get("peer_id") == pid for ad in p.get("addrs", [])]
    return sorted({"quic-v1" if "/quic-v1" in ad else "tcp" if "/tcp/" in ad else ad for ad in addrs})


def relayed_now(r5):
    """Whether the gateway reaches the provider through the relay only."""
    node = json.loads(http_get_in(r5["ns_g"], f"{r5['url']}/node"))
    pid = r5["prov"].ready["peer_id"]
    peers = [p for p in node.get("peers", []) if p.get("peer_id") == pid]
    return bool(peers) and all(p.get("path") == "relayed" for p in peers)


def bench(a, d, t_start):
    # ---- client key, private sshds, socat ------------------------------------------------
    ck = os.path.join(d, "client_ed25519")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ck])
    auth = os.path.join(d, "authorized_keys")
    with open(ck + ".pub") as f, open(auth, "w") as g:
        g.write(f.read())
    os.chmod(auth, 0o600)
    p_direct, p_bastion, p_socat = free_port(), free_port(), free_port()
    hk_target = sshd(d, "target", p_direct, auth)
    hk_bastion = sshd(d, "bastion", p_bastion, auth)
    start(["socat", f"TCP-LISTEN:{p_socat},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{p_direct}"],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(p_socat)
    # path 8: three socats in a row, the floor for three relaying processes
    chain = [free_port() for _ in range(3)]
    for i, p_in in enumerate(chain):
        p_out = chain[i + 1] if i + 1 < len(chain) else p_direct
        start(["socat", f"TCP-LISTEN:{p_in},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{p_out}"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(p_in)
    SOCAT_CHAIN_PORT[0] = chain[0]

    # ---- xe network ------------------------------------------------------------------------
    if a.no_xe:
        return bench_paths(a, d, t_start, ck, p_direct, p_bastion, p_socat, hk_target, hk_bastion, None)
    log("starting xe gateway + provider")
    listen = ["/ip4/127.0.0.1/tcp/0"] + (["/ip4/127.0.0.1/udp/0/quic-v1"] if a.quic else [])
    gw = Node(os.path.join(d, "gw"), ["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
              listen=listen)
    boot = []
    for ad in gw.ready["p2p_addrs"]:
        boot += ["--bootstrap", ad]
    prov = Node(os.path.join(d, "prov"), ["--provide", "--vm-backend", "sshd"] + boot, listen=listen)
    api = gw.ready["api_addr"]
    url = f"http://{api}"
    gw_port = int(gw.ready["ssh_addr"].rsplit(":", 1)[1])
    wallet = os.path.join(d, "w.seed")
    lease_key = os.path.join(d, "w.lease_key")
    run([XE, "wallet", "create", "--wallet", wallet])
    r = run([XE, "lease", "create", "--wallet", wallet, "--node", url, "--provider",
             prov.ready["account"], "--wait", "--timeout", "60"], timeout=90)
    lease = r.stdout.decode().strip().splitlines()[-1].strip()
    assert len(lease) == 64, f"lease hash: {lease!r}"
    vm_hk = ""
    for _ in range(3):
        with urllib.request.urlopen(f"{url}/leases/{lease}?wait=20&since=created", timeout=30) as resp:
            body = json.load(resp)
        if body.get("state") == "accepted":
            vm_hk = body["vm_host_key"]
            break
    assert vm_hk.startswith("ssh-ed25519 "), f"vm host key: {vm_hk!r}"
    log(f"lease {lease} accepted")

    # xe tunnel (HTTP upgrade)
    tun = start([XE, "tunnel", "--wallet", wallet, "--node", url, "--listen", "127.0.0.1:0", lease],
                stdout=subprocess.PIPE, stderr=open(os.path.join(d, "tunnel.log"), "wb"))
    t_port = None
    t_end = time.monotonic() + 30
    while t_port is None and time.monotonic() < t_end:
        l = tun.stdout.readline().decode()
        if not l:
            break
        if "127.0.0.1:" in l:
            t_port = int("".join(c for c in l.split("127.0.0.1:")[1] if c.isdigit()) or "0") or None
    if not t_port:
        raise RuntimeError("xe tunnel printed no port")
    threading.Thread(target=lambda: [None for _ in tun.stdout], daemon=True).start()
    xe = dict(gw=gw, prov=prov, gw_port=gw_port, lease=lease, lease_key=lease_key, vm_hk=vm_hk, t_port=t_port,
              tun=tun, r5=None, url=url, wallet=wallet)
    log(f"gateway -> provider connections (paths 3, 4): {', '.join(gw_transports(xe)) or 'none'}")
    if not a.paths or "5" in a.paths.split(","):
        try:
            xe["r5"] = setup_relayed(d, wallet)
        except Exception as e:  # noqa: BLE001 - reported, the other paths still run
            log(f"path 5 not measured: {e}")
            xe["r5_error"] = str(e)
    return bench_paths(a, d, t_start, ck, p_direct, p_bastion, p_socat, hk_target, hk_bastion, xe)


def bench_paths(a, d, t_start, ck, p_direct, p_bastion, p_socat, hk_target, hk_bastion, xe):
    if xe:
        gw, prov, gw_port, lease, lease_key = xe["gw"], xe["prov"], xe["gw_port"], xe["lease"], xe["lease_key"]
        vm_hk, t_port = xe["vm_hk"], xe["t_port"]
    else:
        gw = prov = None
        gw_port = t_port = 1
        lease, lease_key, vm_hk = "nolease", ck, "ssh-ed25519 AAAA"

    # ---- one ssh_config for every path --------------------------------------------------------
    r5 = xe.get("r5") if xe else None
    xe_url = xe["url"] if xe else "none"
    xe_wallet = xe["wallet"] if xe else "none"
    # paths 7's and 10's ProxyCommands write their CPU (bash `times`) here when they exit
    stdio_times = os.path.join(d, "stdio.times")
    p2p_times = os.path.join(d, "p2p.times")
    times_file = {"7": stdio_times, "10": p2p_times}
    if xe:
        p_peer = xe["prov"].ready["peer_id"]
        p_addr = next(x for x in xe["prov"].ready["p2p_addrs"] if "/tcp/" in x)
    else:
        p_peer = p_addr = "none"
    kh = os.path.join(d, "known_hosts")
    with open(kh, "w") as f:
        f.write(f"target {hk_target}\nbastion {hk_bastion}\n{lease} {vm_hk}\n")
        if r5:
            f.write(f"{r5['lease']} {r5['vm_hk']}\n")
    cfg = os.path.join(d, "ssh_config")
    with open(cfg, "w") as f:
        f.write(f"""Host direct
  HostName 127.0.0.1
  Port {p_direct}
  HostKeyAlias target
  IdentityFile {ck}
Host bastion
  HostName 127.0.0.1
  Port {p_bastion}
  HostKeyAlias bastion
  IdentityFile {ck}
Host viabastion
  HostName 127.0.0.1
  Port {p_direct}
  HostKeyAlias target
  IdentityFile {ck}
  ProxyJump bastion
Host socat
  HostName 127.0.0.1
  Port {p_socat}
  HostKeyAlias target
  IdentityFile {ck}
Host bastionsocat
  HostName 127.0.0.1
  Port {p_socat}
  HostKeyAlias target
  IdentityFile {ck}
  ProxyJump bastion
Host socat3
  HostName 127.0.0.1
  Port {SOCAT_CHAIN_PORT[0]}
  HostKeyAlias target
  IdentityFile {ck}
Host xegw
  HostName 127.0.0.1
  Port {gw_port}
  User {lease}
  HostKeyAlias xe-gateway
  IdentityFile {lease_key}
  StrictHostKeyChecking accept-new
  Ciphers {a.gw_cipher}
Host vm
  ProxyCommand ssh -F {cfg} -W %h:%p xegw
  HostKeyAlias {lease}
  IdentityFile {lease_key}
Host xetun
  HostName 127.0.0.1
  Port {t_port}
  HostKeyAlias {lease}
  IdentityFile {lease_key}
Host xestdio
  ProxyCommand bash -c 'trap "" HUP; "$0" tunnel --stdio --node {xe_url} --wallet {xe_wallet} {lease}; times > {stdio_times}' {XE}
  HostKeyAlias {lease}
  IdentityFile {lease_key}
Host xep2p
  ProxyCommand bash -c 'trap "" HUP; XE_P2P_LISTEN=/ip4/127.0.0.1/tcp/0 "$0" tunnel --p2p --stdio --provider-peer {p_peer} --provider-addr {p_addr} {lease}; times > {p2p_times}' {XE}
  HostKeyAlias {lease}
  IdentityFile {lease_key}
Host xegw5
  HostName 127.0.0.1
  Port {r5["gw_port"] if r5 else 1}
  User {r5["lease"] if r5 else "none"}
  HostKeyAlias xe-gateway-5
  IdentityFile {lease_key}
  StrictHostKeyChecking accept-new
  Ciphers {a.gw_cipher}
Host vmrelay
  ProxyCommand ip netns exec {r5["ns_g"] if r5 else "none"} ssh -F {cfg} -W %h:%p xegw5
  HostKeyAlias {r5["lease"] if r5 else "none"}
  IdentityFile {lease_key}
Host *
  User root
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {kh}
  StrictHostKeyChecking yes
  KexAlgorithms curve25519-sha256
  Ciphers aes128-gcm@openssh.com
  ControlMaster no
  ControlPath none
  LogLevel ERROR
  ConnectTimeout 20
""")
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    paths = [
        ("1", "direct ssh", "direct"),
        ("2", "ssh -J OpenSSH bastion", "viabastion"),
        ("3", "xe gateway -W (overlay, sshd backend)", "vm"),
        ("4", "xe tunnel (HTTP upgrade)", "xetun"),
        ("5", "xe gateway -W, provider through a relay (both behind NAT)", "vmrelay"),
        ("6", "socat TCP relay (floor)", "socat"),
        ("7", "xe tunnel --stdio as ProxyCommand (HTTP upgrade)", "xestdio"),
        ("8", "3 socat TCP relays in a row (floor for 3 relaying processes)", "socat3"),
        ("9", "ssh -J bastion, then a socat relay (floor for path 3's extra hop)", "bastionsocat"),
        ("10", "xe tunnel --p2p --stdio as ProxyCommand (xe ssh --p2p, no gateway)", "xep2p"),
    ]
    if not xe:
        paths = [p for p in paths if p[0] not in ("3", "4", "7", "10")]
    if not r5:
        paths = [p for p in paths if p[0] != "5"]
    # whose CPU is read around each transfer: (gateway, provider) per xe path
    xe_pids = {}
    if xe:
        xe_pids["3"] = xe_pids["4"] = xe_pids["7"] = xe_pids["10"] = (gw.pid, prov.pid)
    if r5:
        xe_pids["5"] = (r5["gw"].pid, r5["prov"].pid)
    # a third process on the path whose CPU is reported too: path 4's `xe tunnel`, path 5's relay
    extra_pid = {}
    if xe:
        extra_pid["4"] = xe["tun"].pid
    if r5:
        extra_pid["5"] = r5["relay"].pid
    if a.paths:
        paths = [p for p in paths if p[0] in a.paths.split(",")]

    def ssh(host, cmd):
        return ["ssh", "-F", cfg, host, cmd]

    # ---- memory per idle session: OpenSSH bastion (all its sshd processes) vs xe gateway --------
    # First, while the gateway's heap holds nothing freed that new sessions
    # could reuse (after the transfers the delta reads as ~0).
    idle = {}
    if a.idle:
        if "bastion" in SSHD_PIDS and any(p[0] == "2" for p in paths):
            idle["2"] = idle_sessions(cfg, env, "viabastion", a.idle,
                                      lambda: memory_kib(tree(SSHD_PIDS["bastion"])))
        if xe and any(p[0] == "3" for p in paths):
            idle["3"] = idle_sessions(cfg, env, "vm", a.idle, lambda: memory_kib([gw.pid]))
        log(f"memory per idle session (RSS, PSS KiB): {idle}")

    # warm-up + correctness: one connect and the sha256 round trip per path
    rnd = os.path.join(d, "random.bin")
    with open(rnd, "wb") as f:
        left = a.check_bytes
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    with open(rnd, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    checks = {}
    for pid_, name, host in paths:
        r = run(ssh(host, "true"), timeout=60, check=False, env=env, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"path {pid_} ({host}) cannot connect: {r.stderr.decode(errors='replace')}")
        remote = f"{d}/rt-{host}.bin"
        with open(rnd, "rb") as f:
            up = run(ssh(host, f"cat > {remote} && sha256sum {remote}"), stdin=f, env=env, timeout=120)
        up_ok = up.stdout.decode().split()[0] == want
        down = run(ssh(host, f"cat {remote}; rm -f {remote}"), env=env, timeout=120, stdin=subprocess.DEVNULL)
        down_ok = hashlib.sha256(down.stdout).hexdigest() == want
        checks[pid_] = up_ok and down_ok
        log(f"path {pid_}: sha256 up {'ok' if up_ok else 'MISMATCH'}, down {'ok' if down_ok else 'MISMATCH'}")

    relayed = None
    if r5:
        relayed = relayed_now(r5)
        log(f"path 5: gateway -> provider {'relayed only' if relayed else 'NOT relayed only'}")

    # ---- connect latency, interleaved so load drift hits every path alike ------------------------
    lat = {p[0]: [] for p in paths}
    for i in range(a.connects):
        for pid_, _, host in paths:
            t0 = time.monotonic()
            r = run(ssh(host, "true"), timeout=60, check=False, env=env, stdin=subprocess.DEVNULL)
            dt = time.monotonic() - t0
            if r.returncode == 0:
                lat[pid_].append(dt)
            else:
                log(f"connect failed on path {pid_}: {r.stderr.decode(errors='replace')[-300:]}")
    log("connect latency done")

    # ---- bulk throughput, rounds of (every path x both directions) ------------------------------
    thr = {(p[0], dr): [] for p in paths for dr in ("up", "down")}
    cpu = {(p[0], dr): [] for p in paths for dr in ("up", "down")}  # gateway CPU s per GiB
    pcpu = {(p[0], dr): [] for p in paths for dr in ("up", "down")}  # provider CPU s per GiB
    extra_cpu = {(p[0], dr): [] for p in paths for dr in ("up", "down")}  # extra_pid's CPU s per GiB
    failures = []
    nbytes = a.bytes
    up_cmd = f"head -c {nbytes} /dev/zero | ssh -F {shlex.quote(cfg)} %s 'cat > /dev/null'"
    down_cmd = f"ssh -F {shlex.quote(cfg)} %s 'head -c {nbytes} /dev/zero' | wc -c"
    rounds = 0
    round_times = []
    while rounds < a.max_runs:
        elapsed = time.monotonic() - t_start
        est = statistics.mean(round_times) if round_times else 0
        if rounds >= a.runs and elapsed + est > a.budget:
            break
        r0 = time.monotonic()
        for pid_, _, host in paths:
            for dr, tmpl in (("up", up_cmd), ("down", down_cmd)):
                pids = xe_pids.get(pid_)
                g0, p0 = (cpu_secs(pids[0]), cpu_secs(pids[1])) if pids else (0, 0)
                q0 = cpu_secs(extra_pid[pid_]) if pid_ in extra_pid else 0
                if pid_ in times_file and os.path.exists(times_file[pid_]):
                    os.unlink(times_file[pid_])
                t0 = time.monotonic()
                pr = subprocess.Popen(["bash", "-o", "pipefail", "-c", tmpl % host], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)
                STARTED.append(pr)
                try:
                    out, err = pr.communicate(timeout=a.transfer_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(pr.pid, signal.SIGKILL)  # the group this script created for it
                    out, err = pr.communicate()
                    failures.append(f"path {pid_} {dr}: timeout after {a.transfer_timeout}s")
                    continue
                dt = time.monotonic() - t0
                g1, p1 = (cpu_secs(pids[0]), cpu_secs(pids[1])) if pids else (0, 0)
                q1 = cpu_secs(extra_pid[pid_]) if pid_ in extra_pid else 0
                if pid_ in times_file:
                    q0, q1 = 0, bash_times_children(times_file[pid_], time.monotonic() + 10)
                if pr.returncode != 0 or (dr == "down" and int(out.split()[0] or 0) != nbytes):
                    failures.append(f"path {pid_} {dr}: rc {pr.returncode} {out[:40]!r} {err[-300:]!r}")
                    continue
                thr[(pid_, dr)].append(nbytes / dt)
                cpu[(pid_, dr)].append((g1 - g0) * GIB / nbytes)
                pcpu[(pid_, dr)].append((p1 - p0) * GIB / nbytes)
                extra = ""
                if pid_ in extra_pid or pid_ in times_file:
                    extra_cpu[(pid_, dr)].append((q1 - q0) * GIB / nbytes)
                    extra = f", {'relay' if pid_ == '5' else 'xe tunnel'} cpu {q1 - q0:.2f}s"
                log(f"round {rounds + 1} path {pid_} {dr}: {nbytes / dt / 1e6:.0f} MB/s "
                    f"(gw cpu {g1 - g0:.2f}s, provider cpu {p1 - p0:.2f}s{extra})")
        rounds += 1
        round_times.append(time.monotonic() - r0)

    total = time.monotonic() - t_start
    if xe:
        log(f"gateway -> provider connections at the end (paths 3, 4): {', '.join(gw_transports(xe)) or 'none'}")
    if r5 and not relayed_now(r5):
        failures.append("path 5: the gateway reached the provider directly at the end (hole punched?)")
    r5_note = None if r5 else (xe or {}).get("r5_error", "not selected")
    report(a, paths, lat, thr, cpu, pcpu, checks, failures, rounds, total, nbytes, relayed, r5_note, idle,
           extra_cpu)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def bash_times_children(path, deadline):
    """Children's user+sys seconds from bash's `times` output (second line,
    e.g. `0m1.234s 0m0.567s`); NaN if the file is unreadable or still
    missing at `deadline` (ssh does not wait for its ProxyCommand, which
    ignores ssh's SIGHUP here so that it can write the file)."""
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)  # `times >` creates the file before it writes the line
    try:
        with open(path) as f:
            lines = f.read().split("\n")
        total = 0.0
        for t in lines[1].split():
            m, sec = t.rstrip("s").split("m")
            total += int(m) * 60 + float(sec)
        return total
    except (OSError, IndexError, ValueError):
        return float("nan")


def report(a, paths, lat, thr, cpu, pcpu, checks, failures, rounds, total, nbytes, relayed, r5_note, idle,
           extra_cpu):
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    out = []
    w = out.append
    w(f"connects per path: {a.connects} (interleaved); bulk: {rounds} round(s) of {nbytes / GIB:g} GiB "
      f"each way per path (median); whole run {total:.0f} s; load average at end {load}")
    w("")
    w("Connect latency, `ssh … true` (lower is better; ratio = this path / reference):")
    w("")
    w("| path | median | min | max | n | × direct (1) | × bastion (2) |")
    w("|---|---|---|---|---|---|---|")
    m1, m2 = med(lat.get("1", [])), med(lat.get("2", []))
    for pid_, name, _ in paths:
        xs = lat[pid_]
        if not xs:
            w(f"| {pid_} {name} | failed | | | 0 | | |")
            continue
        m = med(xs)
        w(f"| {pid_} {name} | {m * 1e3:.0f} ms | {min(xs) * 1e3:.0f} ms | {max(xs) * 1e3:.0f} ms | {len(xs)} "
          f"| {m / m1:.2f}× | {m / m2:.2f}× |")
    if r5_note:
        w(f"| 5 xe via relay | not measured: {r5_note} | | | | | |")
    w("")
    w(f"Bulk throughput, {nbytes / GIB:g} GiB of zeros through `cat > /dev/null` (up) and `head -c` (down), "
      f"MB/s = 10^6 B/s (higher is better), with the xe gateway's and provider's CPU seconds per GiB:")
    w("")
    w("| path | dir | median | min | max | n | × direct (1) | × bastion (2) | gateway CPU s/GiB | provider CPU s/GiB | sha256 |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for pid_, name, _ in paths:
        for dr in ("up", "down"):
            xs = thr[(pid_, dr)]
            ck = "ok" if checks.get(pid_) else "MISMATCH"
            if not xs:
                w(f"| {pid_} {name} | {dr} | failed | | | 0 | | | | | {ck} |")
                continue
            m = med(xs)
            r1 = m / med(thr[("1", dr)]) if thr.get(("1", dr)) else float("nan")
            r2 = m / med(thr[("2", dr)]) if thr.get(("2", dr)) else float("nan")
            xe = pid_ in ("3", "4", "5", "7", "10")
            gc = f"{med(cpu[(pid_, dr)]):.2f}" if xe else "–"
            pc = f"{med(pcpu[(pid_, dr)]):.2f}" if xe else "–"
            w(f"| {pid_} {name} | {dr} | {m / 1e6:.0f} | {min(xs) / 1e6:.0f} | {max(xs) / 1e6:.0f} | {len(xs)} "
              f"| {r1:.2f}× | {r2:.2f}× | {gc} | {pc} | {ck} |")
    if r5_note:
        w(f"| 5 xe via relay | | not measured: {r5_note} | | | | | | | | |")
    elif relayed is not None:
        w("")
        w(f"Path 5: the gateway reached the provider {'through the relay only' if relayed else 'DIRECTLY (not relayed)'} "
          f"when the transfers started. The relay node's CPU: {med(extra_cpu[('5', 'up')]):.2f} s/GiB up, "
          f"{med(extra_cpu[('5', 'down')]):.2f} s/GiB down (median).")
    if extra_cpu.get(("4", "up")) or extra_cpu.get(("4", "down")):
        w("")
        w(f"Path 4: the `xe tunnel` client process's CPU: {med(extra_cpu[('4', 'up')]):.2f} s/GiB up, "
          f"{med(extra_cpu[('4', 'down')]):.2f} s/GiB down (median).")
    if extra_cpu.get(("7", "up")) or extra_cpu.get(("7", "down")):
        w("")
        w(f"Path 7: the `xe tunnel --stdio` ProxyCommand's CPU: {med(extra_cpu[('7', 'up')]):.2f} s/GiB up, "
          f"{med(extra_cpu[('7', 'down')]):.2f} s/GiB down (median).")
    if extra_cpu.get(("10", "up")) or extra_cpu.get(("10", "down")):
        w("")
        w(f"Path 10: the `xe tunnel --p2p --stdio` ProxyCommand's CPU (the consumer's own libp2p host): "
          f"{med(extra_cpu[('10', 'up')]):.2f} s/GiB up, {med(extra_cpu[('10', 'down')]):.2f} s/GiB down (median).")
    if idle:
        w("")
        w(f"Memory per idle session ({a.idle} sessions held at once; `ssh HOST 'echo up; sleep'`), "
          "bastion = all its sshd processes, xe = the gateway process:")
        w("")
        w("| path | RSS per session | PSS per session |")
        w("|---|---|---|")
        for pid_, (rss, pss) in sorted(idle.items()):
            name = dict((p[0], p[1]) for p in paths).get(pid_, pid_)
            w(f"| {pid_} {name} | {rss:.0f} KiB | {pss:.0f} KiB |")
    if failures:
        w("")
        w("Failures:")
        for f_ in failures:
            w(f"- {f_}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
