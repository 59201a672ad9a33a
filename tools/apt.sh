# Sourced by the set-up scripts: Debian package installation that survives a package
# mirror in the middle of a sync. Defines SUDO, package_installed, apt_update and
# apt_install.

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Succeeds when package $1 is installed. A name without an architecture that is installed
# for two (libavcodec-dev for amd64 and arm64, say) is looked up for the host's.
package_installed() {
    local name=$1 status
    # dpkg-query prints one status per installed architecture for a bare name.
    [[ $name == *:* ]] || name="$name:$(dpkg --print-architecture)"
    status=$(dpkg-query -W -f='${db:Status-Status}' "$name" 2>/dev/null) ||
        status=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) ||
        return 1
    [ "$status" = installed ]
}

# Refreshes the package indexes. A mirror that is syncing serves index files whose size
# does not match its Release file, and apt-get update then exits with 100 although most
# indexes arrived. Tries three times, 30 s apart, then carries on with the indexes it
# has. A package that truly cannot be found then fails in apt_install.
apt_update() {
    local attempt
    for attempt in 1 2 3; do
        if $SUDO apt-get update -qq; then
            return 0
        fi
        if [ "$attempt" -lt 3 ]; then
            echo "apt: updating the package indexes failed (attempt $attempt of 3), retrying in 30 s" >&2
            sleep 30
        fi
    done
    echo "apt: some package indexes could not be updated; using the ones already here" >&2
}

# Installs the packages named in "$@", retrying once after a fresh index update when the
# first attempt fails (a mirror sync can also leave a package briefly unfetchable).
apt_install() {
    if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"; then
        return 0
    fi
    echo "apt: installing $* failed; updating the indexes and trying once more" >&2
    sleep 30
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
