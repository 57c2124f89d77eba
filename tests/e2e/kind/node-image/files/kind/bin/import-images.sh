#!/bin/sh
# Waits for containerd, then imports every archive in /kind/images (see
# kind-import-images.service). A failed import fails the unit, and kubelet's pods then
# show ErrImagePull: the journal of this unit says why.
set -eu
i=0
until ctr version >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -le 300 ] || { echo "containerd does not answer after 60 s" >&2; exit 1; }
  sleep 0.2
done
tmp=/var/lib/kind-import
mkdir -p "$tmp"
for archive in /kind/images/*.tar.gz; do
  [ -e "$archive" ] || continue
  echo "importing $archive"
  gzip -dc "$archive" >"$tmp/images.tar"
  ctr --namespace=k8s.io images import --snapshotter=overlayfs "$tmp/images.tar"
  rm -f "$tmp/images.tar"
done
rmdir "$tmp"
