#!/usr/bin/env bash
# `make run`: Redis 7.4 + RedisJSON + kamsync in the foreground, configured by
# redis.conf.example. The example names its modules by absolute path (as an operator's file
# would); this script points those two lines at the project's builds, puts data in .run/, and
# otherwise uses the example as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
port=${1:-6390}
mkdir -p .run
sed -e "s|^loadmodule .*/rejson\.so|loadmodule $root/.deps/redis-7.4/lib/rejson.so|" \
    -e "s|^loadmodule .*/libkamsync\.so|loadmodule $root/target/release/libkamsync.so|" \
    redis.conf.example >.run/redis.conf
echo "kamsync: Redis 7.4 on 127.0.0.1:$port, data in .run/ (Ctrl-C stops it)"
echo "try: .deps/redis-7.4/bin/redis-cli -p $port JSON.SET sipdomain:1 '\$' '{\"name\":\"example.com\"}'"
export LD_LIBRARY_PATH=$root/.deps/libssl1.1/usr/lib/x86_64-linux-gnu
exec .deps/redis-7.4/bin/redis-server .run/redis.conf --port "$port" --dir "$root/.run"
