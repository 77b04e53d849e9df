#!/usr/bin/env bash
# Makes sure the services the tests use answer: MariaDB on 127.0.0.1:3306 (root, no password).
# This machine kind starts it before sessions and CI; if it has stopped, start it the same way.
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
