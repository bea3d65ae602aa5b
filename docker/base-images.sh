#!/usr/bin/env bash
# Makes the Dockerfile's two base images locally when the engine has them not and no registry
# gives them (this project's machines reach Debian's mirror but no image registry):
#   debian:bookworm-slim  debootstrap --variant=minbase of bookworm, docs and apt lists dropped
#                         (the registry's image is made the same way, by debuerreotype)
#   rust:1-bookworm       that, plus gcc/g++/make/git/pkg-config as buildpack-deps has them, plus
#                         this machine's Rust toolchain (rustc, cargo; no docs), at the same
#                         CARGO_HOME/RUSTUP_HOME/PATH as the official image
# An image the engine already has, or can pull, is left alone. Used by docker/image-test.sh;
# needs DOCKER (the client) and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail

DOCKER=${DOCKER:-docker}
WORK=${1:?usage: base-images.sh WORK_DIR}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SLIM=debian:bookworm-slim
RUST=rust:1-bookworm
log() { echo "base-images: $*"; }

have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1 || "$DOCKER" pull -q "$1" >/dev/null 2>&1; }

make_slim() {
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  local rootfs=$WORK/rootfs
  rm -rf "$rootfs"
  log "$SLIM: debootstrap bookworm (minbase) from $MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
  cat >"$rootfs/etc/apt/sources.list" <<LIST
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
LIST
  rm -rf "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["bash"]' - "$SLIM" >/dev/null
  rm -rf "$rootfs"
}

make_rust() {
  local ctx=$WORK/rust-context
  local toolchain
  toolchain=$(rustc --print sysroot)
  rm -rf "$ctx" && mkdir -p "$ctx"
  log "$RUST: $SLIM + build tools + $(rustc --version) from $toolchain"
  # The toolchain without its docs (~800 MB of HTML).
  tar -C "$toolchain" --exclude=./share -c . | tar -C "$ctx" -x --one-top-level=toolchain
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $SLIM
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl g++ gcc git libc6-dev make pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY toolchain /usr/local/rust
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
DOCKERFILE
  DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host -t "$RUST" "$ctx" >/dev/null
  rm -rf "$ctx"
}

mkdir -p "$WORK"
# `if`, not `||`: a function called on the left of || runs with set -e off.
if ! have "$SLIM"; then make_slim; fi
if ! have "$RUST"; then make_rust; fi
log "$SLIM and $RUST ready"
