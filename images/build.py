#!/usr/bin/env python3
"""Builds Skein's container images as OCI image archives, without a container daemon.

Each image is one layer: the binary, exactly the shared libraries it loads (read off `ldd`, with
the loader), `/etc/passwd` and `/etc/group` naming the non-root users, and nothing else: no
shell, no package manager. The proxy image also carries iptables (the nf_tables variant, with
the few extensions the capture rules use) for the `skein-proxy init` step of transparent
capture. Layers are reproducible: files sorted, owned by root, timestamps from
SOURCE_DATE_EPOCH (the commit's time when unset).

Each archive is an OCI image layout (index.json, blobs/) with a docker-style manifest.json too,
so `docker load`, `podman load`, `skopeo`, `kind load image-archive` and the test node's `load`
all take it.

usage: images/build.py --bin-dir target/release --out target/images [--registry R] [--version V]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = "https://github.com/skein-mesh/skein"

# The users of the images: the operator and the demo app run as 65532 ("nonroot", as in the
# distroless images), the sidecar as 1337, the UID that transparent capture lets through.
PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nskein-proxy:x:1337:1337:skein-proxy:/:/sbin/nologin\n" \
         "nonroot:x:65532:65532:nonroot:/:/sbin/nologin\n"
GROUP = "root:x:0:\nskein-proxy:x:1337:\nnonroot:x:65532:\n"
NSSWITCH = "hosts: files dns\n"

# iptables for the capture init step: the nf_tables variant (no legacy kernel modules needed,
# and no lock file), under the names `skein-proxy init` calls, and the extensions its rules use.
IPTABLES_MULTI = "/usr/sbin/xtables-nft-multi"
IPTABLES_NAMES = ["iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore",
                  "ip6tables-save"]
XTABLES_DIR = "/usr/lib/x86_64-linux-gnu/xtables"
XTABLES_EXTENSIONS = ["libxt_standard.so", "libxt_tcp.so", "libxt_udp.so", "libxt_owner.so",
                      "libxt_REDIRECT.so", "libxt_comment.so", "libxt_mark.so", "libxt_MARK.so"]

IMAGES = {
    "skein-operator": {
        "title": "Skein operator",
        "description": "The Skein service mesh control plane: config stream, webhook, mesh CA",
        "binary": "skein-operator", "user": "65532:65532",
    },
    "skein-proxy": {
        "title": "Skein proxy",
        "description": "The Skein sidecar proxy, with iptables for transparent capture",
        "binary": "skein-proxy", "user": "1337:1337", "iptables": True,
    },
    "skein-demo-app": {
        "title": "Skein demo app",
        "description": "A tiny HTTP service that answers with its name and version (tests and demos)",
        "binary": "demo-app", "user": "65532:65532",
    },
}


def die(msg):
    print(f"images/build.py: {msg}", file=sys.stderr)
    sys.exit(1)


def workspace_version():
    text = open(os.path.join(ROOT, "Cargo.toml")).read()
    m = re.search(r'\[workspace\.package\][^\[]*?\nversion\s*=\s*"([^"]+)"', text, re.S)
    return m.group(1) if m else "0.0.0"


def git(*args):
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def shared_libraries(path):
    """The libraries `path` loads (and the loader), as absolute paths, per `ldd`."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        die(f"ldd {path}: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            die(f"{path} needs a library that is missing here: {line}")
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


class Layer:
    """A root filesystem as a reproducible tar stream."""

    def __init__(self, mtime):
        self.mtime = mtime
        self.entries = {}  # path -> (TarInfo, bytes or None)

    def _dirs(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.dir(d)

    def dir(self, path, mode=0o755):
        path = path.strip("/")
        self._dirs(path)
        ti = tarfile.TarInfo(path)
        ti.type, ti.mode = tarfile.DIRTYPE, mode
        self.entries[path] = (ti, None)

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        self._dirs(path)
        ti = tarfile.TarInfo(path)
        ti.size, ti.mode = len(data), mode
        self.entries[path] = (ti, data)

    def symlink(self, path, target):
        path = path.strip("/")
        self._dirs(path)
        ti = tarfile.TarInfo(path)
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
        self.entries[path] = (ti, None)

    def copy(self, host_path, path, mode=None, strip=False):
        real = os.path.realpath(host_path)
        if strip and shutil.which("strip"):
            with tempfile.TemporaryDirectory() as tmp:
                stripped = os.path.join(tmp, "bin")
                subprocess.run(["strip", "-o", stripped, real], check=True)
                data = open(stripped, "rb").read()
        else:
            data = open(real, "rb").read()
        self.file(path, data, mode if mode is not None else (os.stat(real).st_mode & 0o777))

    def with_libraries(self, host_path):
        for lib in shared_libraries(host_path):
            if lib.strip("/") not in self.entries:
                self.copy(lib, lib, 0o755)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                ti, data = self.entries[path]
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = self.mtime, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def rootfs(spec, bin_dir, mtime):
    layer = Layer(mtime)
    layer.file("etc/passwd", PASSWD.encode())
    layer.file("etc/group", GROUP.encode())
    layer.file("etc/nsswitch.conf", NSSWITCH.encode())
    layer.dir("tmp", 0o1777)
    layer.dir("run", 0o755)
    binary = os.path.join(bin_dir, spec["binary"])
    if not os.path.isfile(binary):  # cargo puts examples (the demo app) in examples/
        binary = os.path.join(bin_dir, "examples", spec["binary"])
    if not os.path.isfile(binary):
        die(f"{binary} is missing: build it first (make images does)")
    layer.copy(binary, f"usr/local/bin/{spec['binary']}", 0o755, strip=True)
    layer.with_libraries(binary)
    if spec.get("iptables"):
        if not os.path.isfile(IPTABLES_MULTI):
            die(f"{IPTABLES_MULTI} is missing: install iptables (Debian: apt-get install iptables)")
        layer.copy(IPTABLES_MULTI, IPTABLES_MULTI, 0o755)
        layer.with_libraries(IPTABLES_MULTI)
        for name in IPTABLES_NAMES:
            layer.symlink(f"usr/sbin/{name}", "xtables-nft-multi")
        for ext in XTABLES_EXTENSIONS:
            path = os.path.join(XTABLES_DIR, ext)
            if os.path.exists(path):
                layer.copy(path, path, 0o644)
                layer.with_libraries(path)
    return layer


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def build(name, spec, args, mtime, created):
    layer_tar = rootfs(spec, args.bin_dir, mtime).tar()
    diff_id = sha(layer_tar)
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    ref = f"{args.registry}/{name}:{args.version}"
    labels = {
        "org.opencontainers.image.title": spec["title"],
        "org.opencontainers.image.description": spec["description"],
        "org.opencontainers.image.version": args.version,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.created": created,
    }
    if args.revision:
        labels["org.opencontainers.image.revision"] = args.revision
    entrypoint = [f"/usr/local/bin/{spec['binary']}"]
    config = {
        "created": created, "architecture": "amd64", "os": "linux",
        "config": {
            "User": spec["user"], "Entrypoint": entrypoint, "WorkingDir": "/", "Labels": labels,
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin", "NO_COLOR=1"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "images/build.py"}],
    }
    config_b = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config_b),
                   "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer),
                    "size": len(layer)}],
        "annotations": labels,
    }
    manifest_b = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], "digest": sha(manifest_b), "size": len(manifest_b),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": ref,
                                       "org.opencontainers.image.ref.name": args.version}}],
    }
    blob = lambda b: "blobs/sha256/" + sha(b).split(":", 1)[1]
    docker_manifest = [{"Config": blob(config_b), "RepoTags": [ref], "Layers": [blob(layer)]}]
    files = [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
             ("index.json", json.dumps(index, sort_keys=True).encode()),
             ("manifest.json", json.dumps(docker_manifest).encode())]
    files += [(blob(b), b) for b in (layer, config_b, manifest_b)]
    out = os.path.join(args.out, f"{name}.tar")
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(ti)
        for path, data in files:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, mtime
            tar.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)
    print(f"{out}: {ref}, {os.path.getsize(out) / 1048576:.1f} MiB "
          f"({len(layer_tar) / 1048576:.1f} MiB unpacked), user {spec['user']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True, help="where cargo put the release binaries")
    ap.add_argument("--out", required=True, help="directory for the archives")
    ap.add_argument("--registry", default=os.environ.get("SKEIN_IMAGE_REGISTRY") or "ghcr.io/skein-mesh")
    ap.add_argument("--version", default=os.environ.get("SKEIN_IMAGE_TAG") or workspace_version())
    ap.add_argument("--revision", default=git("rev-parse", "HEAD"))
    ap.add_argument("images", nargs="*", default=list(IMAGES), help="which images (all by default)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    epoch = os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct") or "0"
    mtime = int(epoch)
    import datetime
    created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in args.images:
        if name not in IMAGES:
            die(f"no image {name!r} (images: {', '.join(IMAGES)})")
        build(name, IMAGES[name], args, mtime, created)


if __name__ == "__main__":
    main()
