#!/usr/bin/env bash
# The user's cluster command, end to end, on this one machine: Ray's on-premise (`local`)
# cluster provider pointed at 127.0.0.1 through an sshd on loopback, then
#   ray up -> ray submit <cluster> launch/tune.py -- <smoke preset> -> check results -> ray down.
# Needs root (apt-get, a user, sshd). `make loopback` runs it; it is not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd)
venv="$project/.venv"
work=${LOOPBACK_DIR:-/tmp/cmd-ray-loopback}
user=cmdray
rm -rf "$work"; mkdir -p "$work"; chmod 755 "$work"

command -v sshd >/dev/null && command -v rsync >/dev/null || {
  echo "[loopback] installing openssh-server and rsync"; apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null; }
id -u "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)
# The cluster user's login shell finds the project's venv (ray, python) first.
grep -q 'cmd-ray loopback' "$home/.bashrc" || echo "export PATH=\"$venv/bin:\$PATH\"  # cmd-ray loopback" >> "$home/.bashrc"
mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh"
[ -f "$work/key" ] || ssh-keygen -q -t ed25519 -N "" -f "$work/key"
cp "$work/key.pub" "$home/.ssh/authorized_keys" && chmod 600 "$home/.ssh/authorized_keys"
chown -R "$user:$user" "$home/.ssh" "$work"
# Ray's cluster schema has no SSH port setting: use an sshd on 127.0.0.1:22 (ours if none runs).
if ! (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then
  mkdir -p /run/sshd && ssh-keygen -A >/dev/null
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no -o PidFile="$work/sshd.pid"
  trap 'kill $(cat "$work/sshd.pid") 2>/dev/null || true' EXIT
fi

sed -e "s#@SSH_USER@#$user#" -e "s#@SSH_KEY@#$work/key#" -e "s#@WORK@#$work#" \
  launch/cluster-local.yaml.in > "$work/cluster.yaml"
export RAY_TMPDIR="$work/ray-client"
ray=$venv/bin/ray
echo "[loopback] ray up"; "$ray" up -y --no-config-cache "$work/cluster.yaml"
echo "[loopback] ray submit"
"$ray" submit --no-config-cache "$work/cluster.yaml" launch/tune.py -- \
  --config "$project/launch/configs/fmnist-smoke.yaml" --address 127.0.0.1:6390 \
  --set sweep.storage_path="$work/sweeps" --set data.train_subset=1000 --set epochs=1
echo "[loopback] ray down"; "$ray" down -y "$work/cluster.yaml"
"$venv/bin/python" - "$work/sweeps/fmnist-smoke/results.parquet" <<'PY'
import sys, pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
trials = {r["trial_id"] for r in rows}
assert len(trials) == 4 and all(r["status"] == "finished" for r in rows), rows
print(f"[loopback] ok: {len(trials)} trials in {sys.argv[1]}")
PY
