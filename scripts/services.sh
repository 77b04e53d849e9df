#!/usr/bin/env bash
# Makes sure the services the tests use answer: MariaDB on 127.0.0.1:3306 (root, no password)
# and Redis on 127.0.0.1:6379. This machine kind starts both before sessions and CI; if one has
# stopped, start it the same way.
set -euo pipefail
mariadb_up() { mysqladmin --protocol=tcp -h127.0.0.1 -uroot ping >/dev/null 2>&1; }
if ! mariadb_up; then
  if [ -x /usr/sbin/mariadbd ]; then
    echo "starting MariaDB" >&2
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 1 60); do mariadb_up && break; sleep 0.5; done
  fi
fi
mariadb_up || { echo "error: MariaDB does not answer on 127.0.0.1:3306 (the controller's store tests need it)" >&2; exit 1; }

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if ! redis_up && command -v redis-server >/dev/null; then
  echo "starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
fi
redis_up || { echo "error: Redis does not answer on 127.0.0.1:6379 (the live-state tests need it)" >&2; exit 1; }
