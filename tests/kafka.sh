#!/usr/bin/env bash
# A Kafka-protocol broker on 127.0.0.1:9092 for the Kafka tests: tansu, kept in memory.
#
# The first run installs tansu with cargo (about 19 minutes on 2 cores) into a cache outside
# the checkout, ~/.cache/eda/tansu-$TANSU_VERSION (or $EDA_CACHE), and every later run reuses
# it. The broker runs in the background and its log goes to ~/.cache/eda/tansu.log.
set -euo pipefail

version=${TANSU_VERSION:-0.6.0}
cache=${EDA_CACHE:-$HOME/.cache/eda}
root="$cache/tansu-$version"
tansu="$root/bin/tansu"
kafka_up() { (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; }

if [ ! -x "$tansu" ]; then
    echo "installing tansu $version into $root (once; about 19 minutes on 2 cores)"
    mkdir -p "$cache"
    # dynostore: without it the memory:// storage engine fails at start.
    cargo install --quiet --locked --root "$root" --version "$version" tansu --features dynostore
fi

if ! kafka_up; then
    echo "starting tansu on 127.0.0.1:9092"
    nohup "$tansu" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 \
        --storage-engine memory://tansu/ >"$cache/tansu.log" 2>&1 &
    for _ in $(seq 1 60); do
        kafka_up && break
        sleep 0.5
    done
fi
if ! kafka_up; then
    echo "tansu did not accept connections on 127.0.0.1:9092; its log is $cache/tansu.log:" >&2
    tail -n 20 "$cache/tansu.log" >&2 || true
    exit 1
fi
echo "accepting connections"
