#!/bin/sh
# Installs the Edgeport agent into a root filesystem: the running system (ROOT=/) or an image
# being built (ROOT=/path/to/rootfs, for a Yocto/Buildroot overlay or a plain rootfs copy).
# Idempotent: running it again changes nothing unless an input changed; an existing
# /etc/edgeport/agent.env is kept unless new values are given.
#
#   install.sh BINARY [--gateway H:P --token T --ca-pin P [--id ID] [--labels k=v,...]]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-/}
bin=${1:?usage: install.sh BINARY [--gateway H:P --token T --ca-pin P [--id ID] [--labels L]]}
shift
gateway= token= pin= id= labels=
while [ $# -gt 0 ]; do
  case "$1" in
    --gateway) gateway=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --ca-pin) pin=$2; shift 2 ;;
    --id) id=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/edgeport"
chmod 0700 "$ROOT/etc/edgeport"
install -d -m 0700 "$ROOT/var/lib/edgeport"
install -m 0755 "$bin" "$ROOT/usr/local/bin/edge-agent"
install -m 0755 "$here/edge-agent-run" "$ROOT/usr/local/bin/edge-agent-run"

env="$ROOT/etc/edgeport/agent.env"
if [ -n "$gateway$token$pin" ]; then
  tmp="$env.tmp.$$"
  umask 077
  {
    echo "EDGEPORT_GATEWAY=$gateway"
    echo "EDGEPORT_TOKEN=$token"
    echo "EDGEPORT_CA_PIN=$pin"
    echo "EDGEPORT_DATA_DIR=/var/lib/edgeport"
    [ -n "$id" ] && echo "EDGEPORT_DEVICE_ID=$id"
    [ -n "$labels" ] && echo "EDGEPORT_LABELS=$labels"
  } > "$tmp"
  mv "$tmp" "$env"
elif [ ! -f "$env" ]; then
  install -m 0600 "$here/agent.env.example" "$env"
fi
chmod 0600 "$env"

if [ -d "$ROOT/etc/systemd/system" ] || command -v systemctl >/dev/null 2>&1; then
  install -d -m 0755 "$ROOT/etc/systemd/system/multi-user.target.wants"
  install -m 0644 "$here/edgeport-agent.service" "$ROOT/etc/systemd/system/edgeport-agent.service"
  ln -sf ../edgeport-agent.service "$ROOT/etc/systemd/system/multi-user.target.wants/edgeport-agent.service"
fi
if [ -d "$ROOT/etc/init.d" ]; then
  install -m 0755 "$here/edgeport-agent.init" "$ROOT/etc/init.d/edgeport-agent"
fi
echo "installed edge-agent into $ROOT"
