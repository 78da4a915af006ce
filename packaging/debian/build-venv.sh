#!/bin/bash
# Build hostd's private virtual environment for the package, DESTDIR/usr/lib/hostd/venv, and
# the commands that run in it (hostd, hostctl, hostd-runtime). The venv has Debian's
# /usr/bin/python3 and its site-packages (python3-pyroute2, python3-systemd), the pinned
# modules of requirements.txt from PyPI (the whole closure: --no-deps), and hostd itself with
# its compiled cffi module. A venv is not relocatable: it is made in DESTDIR, then every
# mention of DESTDIR in it (pip's scripts, pyvenv.cfg's `command`, pip's direct_url.json) is
# removed, so that it works at /usr/lib/hostd/venv. Run from the source root (debian/rules).
#
#   bash debian/build-venv.sh DESTDIR
set -euo pipefail
dest=$(realpath -m "${1:?usage: build-venv.sh DESTDIR}")
final=/usr/lib/hostd/venv
venv=$dest$final
python=/usr/bin/python3  # never a python3 found on PATH (a pyenv, say)

rm -rf "$venv"
"$python" -m venv --without-pip --system-site-packages "$venv"
pip=("$python" -m pip --python "$venv/bin/python3" --disable-pip-version-check --no-cache-dir
  install --no-compile --no-warn-script-location)
"${pip[@]}" --no-deps --ignore-installed --only-binary :all: -r debian/requirements.txt
# hostd: setuptools and wheel from Debian, cffi from the venv (no build isolation: no download)
"${pip[@]}" --no-deps --no-build-isolation .
# Every module of hostd imports: each dependency is met, from the venv or from Debian.
"$venv/bin/python3" -I -c '
import importlib, pkgutil, hostd, runtime
for pkg in (hostd, runtime):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
'
rm -rf build ./*.egg-info

site=$venv/lib/python3.11/site-packages
# pip's scripts in bin/ would name the build directory: the commands are wrappers instead.
find "$venv/bin" -type f -delete
rm -f "$site"/hostd-*.dist-info/direct_url.json  # file:// URL of the build directory
sed -i '/^command = /d' "$venv/pyvenv.cfg"
# -I: no PYTHON* variables, no user site-packages, not the current directory on sys.path.
# hostd-login is not one of them: ordinary users run it, with the system python3 and only
# stdlib modules of hostd (packaging/hostd-login, hostd.links).
wrapper() {  # PATH MODULE
  install -d "$dest/$(dirname "$1")"
  printf '#!/bin/sh\nexec %s/bin/python3 -I -c %s "$@"\n' "$final" \
    "'import sys; from $2 import main; sys.exit(main())'" >"$dest/$1"
  chmod 0755 "$dest/$1"
}
wrapper usr/sbin/hostd hostd.daemon
wrapper usr/bin/hostctl hostd.hostctl  # members of hostd-admin use it too: not in sbin
wrapper usr/sbin/hostd-runtime runtime.cli
find "$venv" -name __pycache__ -prune -exec rm -rf {} +  # compiled in postinst
rmdir "$venv/include/python3.11" "$venv/include"  # no headers: nothing is built against it
if grep -rIl -- "$dest" "$venv"; then
  echo "build-venv.sh: the files above name the build directory $dest" >&2
  exit 1
fi
