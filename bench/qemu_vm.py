#!/usr/bin/env python3
"""The qemu backend, measured: boot-to-accept, the provider's memory per VM
beyond the guest's own, and throughput into a VM through the gateway next
to the same VM reached directly on its forwarded port.

    sudo python3 bench/qemu_vm.py --image-dir DIR [--vms 1,2] [--mib 32] [--runs 3] [--qemu-flags '…']

DIR is what `vm/images/build-debian.sh DIR` wrote. Loopback only; one
gateway and one provider node (target/release/xe, or XE_BIN), each its own
process; bounded in time (every wait has a limit); stops only what it
started, by PID. For each VM count N in --vms: N leases (1 vCPU, 512 MiB
each) are created at once and the time until all are accepted is recorded,
then QEMU's RSS/PSS (from /proc/PID/smaps_rollup) and the RSS of the guest's
RAM mapping (the mapping of exactly -m bytes in /proc/PID/smaps) give the
per-VM overhead; then the leases are settled. Throughput: --runs uploads
and downloads of --mib MiB through `ssh -W` via the gateway and direct to
127.0.0.1:PORT (the VM's hostfwd), one VM, medians reported.
"""

import argparse
import json
import shlex
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XE = os.environ.get("XE_BIN") or os.path.join(ROOT, "target", "release", "xe")
STARTED = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def start_node(data, args):
    os.makedirs(data, exist_ok=True)
    logf = open(os.path.join(data, "node.log"), "w")
    p = subprocess.Popen(
        [XE, "node", "--data", data, "--p2p-listen", "/ip4/127.0.0.1/tcp/0", *args],
        stdout=subprocess.PIPE, stderr=logf, text=True,
        env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
    )
    STARTED.append(p)
    line = p.stdout.readline()
    if not line:
        sys.exit(f"node in {data} did not start; see {data}/node.log")
    return p, json.loads(line)


def api(addr, path, body=None, timeout=30):
    req = urllib.request.Request(f"http://{addr}{path}", data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def xe(*args, timeout=900):
    return subprocess.run([XE, *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


def smaps(pid, guest_mib):
    """(rss_kib, pss_kib, guest_ram_rss_kib) of one QEMU."""
    roll = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                roll[k] = int(v.split()[0])
    guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:") and size == guest_mib * 1024:
                guest += int(line.split()[1])
    return roll.get("Rss", 0), roll.get("Pss", 0), guest


def timed(cmd, stdin=None, timeout=600):
    t = time.monotonic()
    subprocess.run(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=timeout, check=True)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-dir", required=True)
    ap.add_argument("--vms", default="1,2")
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--qemu-flags", default="", help="extra provider flags, e.g. '--qemu-tcg-tb-mib 1024'")
    a = ap.parse_args()
    img = os.path.abspath(a.image_dir)
    d = tempfile.mkdtemp(prefix="xe-qemu-bench-")
    try:
        gw, gready = start_node(f"{d}/gw", ["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        boot = []
        for addr in gready["p2p_addrs"]:
            boot += ["--bootstrap", addr]
        prov, pready = start_node(f"{d}/provider", [
            "--provide", "--vm-backend", "qemu", "--api-listen", "127.0.0.1:0",
            "--qemu-image", f"{img}/debian-12.qcow2", "--qemu-kernel", f"{img}/vmlinuz",
            "--qemu-initrd", f"{img}/initrd.img", *shlex.split(a.qemu_flags), *boot])
        gapi, papi = gready["api_addr"], pready["api_addr"]
        wallet = f"{d}/me.seed"
        xe("wallet", "create", "--wallet", wallet)
        key = f"{d}/me.lease_key"
        results = {}
        with open(f"/proc/{prov.pid}/status") as f:
            node_rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
        for n in [int(x) for x in a.vms.split(",")]:
            log(f"booting {n} VM(s) at once…")
            t = time.monotonic()
            procs = [subprocess.Popen([XE, "lease", "create", "--wallet", wallet, "--node", f"http://{gapi}",
                                       "--provider", pready["account"], "--vcpus", "1", "--memory-mb", "512",
                                       "--duration", "3600", "--wait", "--timeout", "900"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                     for _ in range(n)]
            leases = [p.communicate(timeout=960)[0].strip().splitlines()[-1] for p in procs]
            took = time.monotonic() - t
            mem = []
            for lease in leases:
                pid = int(open(f"{d}/provider/vms/qemu/{lease}/qemu.pid").read())
                mem.append(smaps(pid, 512))
            with open(f"/proc/{prov.pid}/status") as f:
                node_now = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
            results[n] = (took, mem, node_now - node_rss)
            log(f"  {n} VM(s): all accepted in {took:.1f} s; QEMU rss/pss/guest-ram KiB {mem}")
            if n == int(a.vms.split(",")[0]):
                results["lease"] = leases[0]
            for lease in leases[1:] if n == int(a.vms.split(",")[0]) else leases:
                xe("lease", "settle", "--wallet", wallet, "--node", f"http://{gapi}", lease)
        lease = results["lease"]
        _, body = api(gapi, f"/leases/{lease}")
        _, vm = api(papi, f"/vms/{lease}")
        port = vm["ssh_port"]
        with open(f"{d}/known_hosts", "w") as f:
            f.write(f"{lease} {body['vm_host_key']}\n")
        gwport = gready["ssh_addr"].rsplit(":", 1)[1]
        common = ["-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                  "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", f"HostKeyAlias={lease}",
                  "-o", "StrictHostKeyChecking=yes", "-o", "KexAlgorithms=curve25519-sha256",
                  "-o", "Ciphers=aes128-gcm@openssh.com"]
        via_gw = common + ["-o", f"ProxyCommand=ssh -F /dev/null -p {gwport} -i {key} -o IdentitiesOnly=yes "
                           f"-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                           f"-W %h:%p {lease}@127.0.0.1", "root@vm"]
        direct = common + ["-p", str(port), "root@127.0.0.1"]
        payload = f"{d}/payload"
        with open(payload, "wb") as f:
            f.write(os.urandom(a.mib << 20))
        thr = {}
        for name, argv in [("gateway (ssh -W)", via_gw), ("direct (hostfwd port)", direct)]:
            up, down = [], []
            for _ in range(a.runs):
                with open(payload, "rb") as f:
                    up.append(timed(["ssh", *argv, "cat > /tmp/p"], stdin=f))
                down.append(timed(["ssh", *argv, "cat /tmp/p"]))
            thr[name] = (a.mib / statistics.median(up), a.mib / statistics.median(down))
            log(f"  {name}: up {thr[name][0]:.2f} MiB/s, down {thr[name][1]:.2f} MiB/s")
        print("\n| VMs booted at once | all accepted after | per QEMU: RSS / PSS / guest RAM resident (MiB) | overhead beyond guest RAM (MiB) | provider xe node RSS growth (MiB) |")
        print("|---|---|---|---|---|")
        for n in [int(x) for x in a.vms.split(",")]:
            took, mem, node = results[n]
            cells = "; ".join(f"{r/1024:.0f} / {p/1024:.0f} / {g/1024:.0f}" for r, p, g in mem)
            over = "; ".join(f"{(r-g)/1024:.0f}" for r, _, g in mem)
            print(f"| {n} | {took:.1f} s | {cells} | {over} | {node/1024:.1f} |")
        print(f"\n| path ({a.mib} MiB, median of {a.runs}) | up MiB/s | down MiB/s |")
        print("|---|---|---|")
        for name, (u, dn) in thr.items():
            print(f"| {name} | {u:.2f} | {dn:.2f} |")
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.terminate()
        for p in STARTED:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
