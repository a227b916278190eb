#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, doc, UI (trybuild), end-to-end and process
# tests. It starts what the tests need and fails loudly when it cannot: PostgreSQL on
# 127.0.0.1:5432 (trust auth), for the PostgreSQL log, NATS with JetStream on
# 127.0.0.1:4222, for the NATS transport, RabbitMQ on 127.0.0.1:5672 (guest/guest), for the
# RabbitMQ transport, and a Kafka-protocol broker on 127.0.0.1:9092 (tansu, installed once into
# ~/.cache/eda by tests/kafka.sh), for the Kafka transport.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "OpenSSL headers (librdkafka, for the Kafka transport, builds against them)"
if ! pkg-config --exists openssl 2>/dev/null; then
    echo "libssl-dev is missing; installing it"
    apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config
fi
pkg-config --modversion openssl

step "PostgreSQL on 127.0.0.1:5432"
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "PostgreSQL is not accepting connections; starting it"
    for version in /etc/postgresql/*; do
        pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && break
        sleep 1
    done
fi
if ! pg_isready -h 127.0.0.1 -p 5432; then
    echo "PostgreSQL is needed on 127.0.0.1:5432 with trust auth for user postgres; start it and run again" >&2
    exit 1
fi
# A fresh database for every run: each test makes its own tables in it, under its own prefix.
psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "DROP DATABASE IF EXISTS eda_test WITH (FORCE)" -c "CREATE DATABASE eda_test"

step "NATS with JetStream on 127.0.0.1:4222"
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }
if ! nats_up; then
    echo "NATS is not accepting connections; starting it"
    if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
        server=$(command -v nats-server || echo /usr/sbin/nats-server)
        mkdir -p /var/lib/nats-server
        start-stop-daemon --start --oknodo --background --exec "$server" -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
        for _ in $(seq 1 30); do
            nats_up && break
            sleep 1
        done
    fi
fi
if ! nats_up; then
    echo "NATS with JetStream is needed on 127.0.0.1:4222 (nats-server -js); start it and run again" >&2
    exit 1
fi
echo "accepting connections"

step "RabbitMQ on 127.0.0.1:5672"
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
    echo "RabbitMQ is not accepting connections; starting it"
    if command -v rabbitmqctl >/dev/null 2>&1; then
        # A node that runs with its application stopped only needs start_app.
        rabbitmqctl start_app >/dev/null 2>&1 || rabbitmq-server -detached || true
        for _ in $(seq 1 60); do
            amqp_up && break
            sleep 1
        done
    fi
fi
if ! amqp_up; then
    echo "RabbitMQ is needed on 127.0.0.1:5672 with user guest/guest (Debian package rabbitmq-server); start it and run again" >&2
    exit 1
fi
echo "accepting connections"

step "Kafka protocol (tansu) on 127.0.0.1:9092"
tests/kafka.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo doc (our crates, warnings are errors: broken links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps --all-features -p eda-core -p eda-macros -p eda-runtime

step "cargo test (all features)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-features 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary and doc-test run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntotal: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
