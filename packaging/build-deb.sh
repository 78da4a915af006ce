#!/bin/bash
# Build the Debian package hostd_<version>_<arch>.deb into OUTDIR (default: dist/) from this
# checkout's tracked files (as they are in the work tree: uncommitted edits included, untracked
# files not). dpkg-buildpackage wants debian/ at the source root: the tree is copied to a
# temporary directory with packaging/debian as debian/. Missing build dependencies are
# installed with apt-get when run as root. The build fetches the pinned Python modules of
# packaging/debian/requirements.txt from PyPI (see packaging/debian/build-venv.sh).
# HOSTD_DEB_VERSION=V builds the same tree as version V (a changelog entry added in the
# temporary copy): the tests' upgrade from this checkout to a newer package.
#
#   [HOSTD_DEB_VERSION=V] bash packaging/build-deb.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")

git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
  { echo "build-deb.sh: needs a git checkout (it packages the tracked files)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
packaged=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$version" != "$packaged" ]; then
  echo "build-deb.sh: pyproject.toml says $version, packaging/debian/changelog $packaged:" \
    "add a changelog entry for $version (dch -v $version)" >&2
  exit 1
fi

tmp=$(mktemp -d /tmp/hostd-deb.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
src=$tmp/hostd-$version
mkdir "$src"
git ls-files -z | tar --null -T - -c --ignore-failed-read 2>/dev/null | tar -x -C "$src"
cp -r packaging/debian "$src/debian"
if [ -n "${HOSTD_DEB_VERSION:-}" ]; then
  maintainer=$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)
  { printf 'hostd (%s) unstable; urgency=medium\n\n  * Test build of %s.\n\n -- %s  %s\n\n' \
      "$HOSTD_DEB_VERSION" "$version" "$maintainer" "$(date -R)"
    cat packaging/debian/changelog; } >"$src/debian/changelog"
  packaged=$HOSTD_DEB_VERSION
fi

if ! (cd "$src" && dpkg-checkbuilddeps 2>/dev/null); then
  if [ "$(id -u)" -ne 0 ]; then
    (cd "$src" && dpkg-checkbuilddeps) || true
    echo "build-deb.sh: install the build dependencies above (or run as root)" >&2
    exit 1
  fi
  echo "installing the build dependencies of hostd"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq --no-install-recommends "$src" >/dev/null
fi

(cd "$src" && dpkg-buildpackage -us -uc -b)
mkdir -p "$out"
mv "$tmp"/hostd_"$packaged"_*.deb "$out/"
ls "$out"/hostd_"$packaged"_*.deb
