#!/bin/sh
# A local S3 server (Ceph RGW on a throwaway one-node cluster), for humans.
#
#   scripts/rgw.sh start DIR [OPTIONS]   start in the background; prints one line
#                                        of JSON: endpoint_url, access_key, ...
#   scripts/rgw.sh run DIR [OPTIONS]     the same in the foreground (Ctrl-C stops)
#   scripts/rgw.sh stop DIR              stop it; deletes DIR unless started --keep
#   scripts/rgw.sh status DIR            print DIR/server.json and whether it runs
#
# OPTIONS (see `python -m objcache.testing.s3servers rgw --help`): --port P,
# --host 127.0.0.N, --mon-port P, --access-key K, --secret-key S,
# --store-bytes 4G, --objectstore bluestore, --keep.
#
# DIR must be new or empty: it holds the whole cluster (RAM-backed objects by
# default; nothing survives a stop). Needs the Debian packages
# ceph-mon ceph-osd radosgw ceph-common. Several clusters can run at once
# with different DIRs (ports are picked free unless given).
#
# Example:
#   eval "$(scripts/rgw.sh start /tmp/rgw | python3 -c 'import json,sys; d=json.load(sys.stdin);
#   print(f"export AWS_ENDPOINT_URL={d[\"endpoint_url\"]} AWS_ACCESS_KEY_ID={d[\"access_key\"]} AWS_SECRET_ACCESS_KEY={d[\"secret_key\"]}")')"
#   aws s3 mb s3://demo
#   scripts/rgw.sh stop /tmp/rgw
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    py=$repo/.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2
case $cmd in
    start)  exec "$py" -m objcache.testing.s3servers rgw --dir "$dir" "$@" ;;
    run)    exec "$py" -m objcache.testing.s3servers rgw --dir "$dir" --foreground "$@" ;;
    stop)   exec "$py" -m objcache.testing.s3servers stop --dir "$dir" "$@" ;;
    status) exec "$py" -m objcache.testing.s3servers status --dir "$dir" "$@" ;;
    *)      usage ;;
esac
