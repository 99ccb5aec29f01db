#!/usr/bin/env bash
# The one set-up of tokenfabric: the Debian packages, the project venv and the install.
# README.md's first command and .ci/run both run this script, so a new user and CI get
# the same machine (tests/unit/test_setup_script.py fails when they drift apart).
#
#   bash scripts/setup.sh                  install what is missing (idempotent), as root
#   bash scripts/setup.sh --list-packages  print the Debian packages, one line, and exit
#
# Every Debian package a lab requirement names (tokenfabric/requirements.py) is listed
# here; a test checks that too.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# mininet: hosts and links (mnexec, its Python module); openvswitch-switch: the OVS
# dataplane; iproute2 (ip, tc) and net-tools (ifconfig): Mininet's links and the hosts'
# addresses; ethtool, iputils-ping, tcpdump, curl: Mininet's link set-up, the tests and the
# failover capture; python3-venv: the venv below; python3-thrift: BMv2's simple_switch_CLI.
APT_PACKAGES="mininet openvswitch-switch iproute2 net-tools ethtool iputils-ping tcpdump curl python3-venv python3-thrift postgresql"

if [ "${1:-}" = "--list-packages" ]; then
  echo "$APT_PACKAGES"
  exit 0
fi

# Debian packages: only the missing ones, so that a second run needs no network.
if command -v dpkg-query >/dev/null; then
  missing=$(for p in $APT_PACKAGES; do
              status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
              [ "$status" = "install ok installed" ] || echo "$p"
            done | xargs)
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing Debian packages: $missing"
      apt-get -o DPkg::Lock::Timeout=600 update -qq
      apt-get -o DPkg::Lock::Timeout=600 install -y -qq $missing >/dev/null
    else
      # Not fatal: the unit tests, the controller and the agent run without them, and
      # the lab's preflight names whatever it then lacks.
      echo "setup: not root, so these Debian packages are not installed: $missing" >&2
      echo "setup: run as root: apt-get install -y $missing" >&2
    fi
  fi
fi

# The project venv: Debian's python3 with its site-packages, because Mininet's Python
# module lives there. Another python3 only where Debian's cannot make a venv.
PY=python3
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null && PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: making .venv with $PY (--system-site-packages)"
  "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all]'
echo "setup: done; .venv/bin/tokenfabric doctor lists what the lab finds"
