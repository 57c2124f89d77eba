#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (for `ctr images import`) without a registry.

    oci-image.py OUT.tar NAME FILE ENTRYPOINT [ARG...]

The layer holds FILE as /<basename of FILE> (mode 0755, owner 0:0, mtime 0), the image
runs ENTRYPOINT ARG... The archive names the image NAME (annotation
io.containerd.image.name, which `ctr images import` uses). The output is byte-for-byte
reproducible for the same inputs.
"""
import hashlib
import io
import json
import os
import sys
import tarfile


def tar_bytes(entries):
    """A ustar archive of (name, bytes, mode) entries, reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    out, name, path = sys.argv[1:4]
    entrypoint = sys.argv[4:]
    with open(path, "rb") as f:
        binary = f.read()

    blobs = {}

    def blob(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer = tar_bytes([(os.path.basename(path), binary, 0o755)])
    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config, sort_keys=True).encode(),
                       "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob(json.dumps(manifest, sort_keys=True).encode(),
                         "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}

    entries = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644),
               ("index.json", json.dumps(index, sort_keys=True).encode(), 0o644)]
    for digest in sorted(blobs):
        entries.append(("blobs/sha256/" + digest.split(":", 1)[1], blobs[digest], 0o644))
    tmp = out + ".partial"
    with open(tmp, "wb") as f:
        f.write(tar_bytes(entries))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
