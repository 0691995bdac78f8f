#!/usr/bin/env bash
# The user's cluster command, end to end, on this one machine: Ray's on-premise (`local`)
# cluster provider pointed at 127.0.0.1 through an sshd on loopback, then
#   ray up -> ray submit <cluster> launch/tune.py -- <smoke preset> -> check results -> ray down.
# Needs root (apt-get, sshd); adds a key and a PATH line for this user and removes them after. `make loopback` runs it; it is not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd)
venv="$project/.venv"
work=${LOOPBACK_DIR:-/tmp/cmd-ray-loopback}
user=$(id -un)  # the venv lives under this user's files
rm -rf "$work"; mkdir -p "$work"; chmod 755 "$work"

command -v sshd >/dev/null && command -v rsync >/dev/null || {
  echo "[loopback] installing openssh-server and rsync"; apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null; }
home=$(getent passwd "$user" | cut -d: -f6)
[ -f "$work/key" ] || ssh-keygen -q -t ed25519 -N "" -f "$work/key"
tag="cmd-ray loopback $$"
cleanup() {
  [ -n "${up:-}" ] && "$venv/bin/ray" down -y "$work/cluster.yaml" >/dev/null 2>&1 || true
  # Leave the user's shell and SSH setup as they were.
  sed -i "/$tag/d" "$home/.bashrc" "$home/.ssh/authorized_keys" 2>/dev/null || true
  [ -f "$work/sshd.pid" ] && kill "$(cat "$work/sshd.pid")" 2>/dev/null || true
}
trap cleanup EXIT
# The login shell `ray up`/`ray submit` use must find the project's venv (ray, python) first.
echo "export PATH=\"$venv/bin:\$PATH\"  # $tag" >> "$home/.bashrc"
# This machine's Ray token (~/.ray/auth_token) turns token auth on for `ray start`; the
# submitted driver must then authenticate too.
[ -f "$home/.ray/auth_token" ] && echo "export RAY_AUTH_MODE=token  # $tag" >> "$home/.bashrc"
mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh"
echo "$(cat "$work/key.pub") $tag" >> "$home/.ssh/authorized_keys" && chmod 600 "$home/.ssh/authorized_keys"
# Ray's cluster schema has no SSH port setting: use an sshd on 127.0.0.1:22 (ours if none runs).
if ! (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then
  mkdir -p /run/sshd && ssh-keygen -A >/dev/null
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no -o PidFile="$work/sshd.pid"
fi

sed -e "s#@SSH_USER@#$user#" -e "s#@SSH_KEY@#$work/key#" -e "s#@WORK@#$work#" \
  launch/cluster-local.yaml.in > "$work/cluster.yaml"
export RAY_TMPDIR="$work/ray-client"
ray=$venv/bin/ray
echo "[loopback] ray up"; up=1; "$ray" up -y --no-config-cache "$work/cluster.yaml"
echo "[loopback] ray submit"
"$ray" submit --no-config-cache "$work/cluster.yaml" launch/tune.py -- \
  --config "$project/launch/configs/fmnist-smoke.yaml" --address 127.0.0.1:6390 \
  --set sweep.storage_path="$work/sweeps" --set data.train_subset=1000 --set epochs=1
echo "[loopback] ray down"; "$ray" down -y "$work/cluster.yaml"; up=
"$venv/bin/python" - "$work/sweeps/fmnist-smoke/results.parquet" <<'PY'
import sys, pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
trials = {r["trial_id"] for r in rows}
assert len(trials) == 6 and all(r["status"] == "finished" for r in rows), rows
print(f"[loopback] ok: {len(trials)} trials in {sys.argv[1]}")
PY
