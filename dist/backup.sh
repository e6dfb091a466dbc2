#!/usr/bin/env bash
# Copies a kvstore data directory while its server runs, into a directory a server can
# start from: the newest snapshot, then every log segment, then checks the copy.
#
#   dist/backup.sh /var/lib/kvstore/7379 /backups/kvstore-$(date +%F)
#
# Why this order is safe: snapshots and segments are only ever created whole (written
# under a temp name, then renamed) or appended to, never rewritten, so a copied file is
# the file as it was, or a prefix of the live segment that the server is appending to (a
# "torn tail": `check-log --repair` and the server both truncate it to the last whole
# record). Compaction may delete segments while we copy; a segment the snapshot needed
# that vanished makes the check below fail instead of producing a silently short backup,
# and the script then tries again. `SAVE` first (kvstore client -p PORT SAVE) makes the
# backup one snapshot and a short log.
#
# The copy holds every write acknowledged before the script started (and perhaps some
# after). Restore: start `kvstore server --data-dir DEST` on it (a single node), or move
# DEST into place of a data directory while its server is stopped. Cluster members need no
# backups to recover a lost node (it catches up from its peers); this is for keeping
# history or moving data. The cluster's meta file and LOCK are not copied.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 DATA_DIR DEST (DEST must not exist)" >&2
  exit 2
fi
src=$1
dest=$2
kvstore=${KVSTORE_BIN:-kvstore}

if [ ! -d "$src" ]; then
  echo "backup: $src is not a directory" >&2
  exit 2
fi
if [ -e "$dest" ]; then
  echo "backup: $dest exists; give a new directory" >&2
  exit 2
fi

attempt() {
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  local snap
  snap=$(find "$src" -maxdepth 1 -name 'snapshot-*.snap' -printf '%f\n' | sort | tail -n 1)
  if [ -n "$snap" ]; then
    # A snapshot can be deleted by a newer one's compaction: then try again.
    cp "$src/$snap" "$dest.partial/" || return 1
  fi
  # Segments after the snapshot; ones compacted away meanwhile are simply gone.
  local seg
  for seg in $(find "$src" -maxdepth 1 -name 'wal-*.log' -printf '%f\n' | sort); do
    cp "$src/$seg" "$dest.partial/" 2>/dev/null || [ ! -e "$src/$seg" ] || return 1
  done
  # Whole and readable: a torn last record is truncated, anything else refused.
  "$kvstore" check-log --repair "$dest.partial" >"$dest.partial.check" 2>&1 || return 1
}

for try in 1 2 3 4 5; do
  if attempt; then
    cat "$dest.partial.check"
    rm -f "$dest.partial.check"
    mv "$dest.partial" "$dest"
    echo "backup: $dest ready"
    exit 0
  fi
  echo "backup: attempt $try failed (a compaction ran meanwhile?):" >&2
  cat "$dest.partial.check" >&2 2>/dev/null || true
done
rm -rf "$dest.partial" "$dest.partial.check"
echo "backup: gave up after 5 attempts" >&2
exit 1
