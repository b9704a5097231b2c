#!/usr/bin/env bash
# The images' base where no registry is at hand: what distroless's cc-debian12:nonroot holds
# (Debian 12's glibc, libgcc, libstdc++, libgomp, tzdata, netbase; users root and nonroot
# 65532; no shell, no package manager), made from Debian packages by mmdebstrap and committed
# by buildah as a local image. Prints the image's name; reuses it when present.
#
#   images/base.sh                      the base of the operator and trainer images
#   images/base.sh busybox              the same plus Debian's busybox-static as /bin/sh (the
#                                       e2e's small shell image, standing in for busybox:1.36)
#
# RLT_BUILDAH_ROOT as for images/build.sh; the root filesystem tarballs are cached in
# ${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}/rootfs.
set -euo pipefail
flavor="${1:-base}"
packages=base-files,netbase,tzdata,libc6,libgcc-s1,libstdc++6,libgomp1
case "$flavor" in
  base) image=localhost/rlt/base-debian12:nonroot ;;
  busybox) image=localhost/rlt/busybox-debian12:bookworm packages="$packages,busybox-static" ;;
  *) echo "usage: images/base.sh [busybox]" >&2; exit 2 ;;
esac
# shellcheck source=images/buildah.sh
. "$(dirname "${BASH_SOURCE[0]}")/buildah.sh"
if bah inspect --type image "$image" >/dev/null 2>&1; then echo "$image"; exit 0; fi

cache="${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}/rootfs"
tar="$cache/$flavor-bookworm.tar"
mkdir -p "$cache"
if [ ! -s "$tar" ]; then
  echo "[images] $flavor root filesystem from Debian packages (mmdebstrap)" >&2
  # `extract`: the packages' files without maintainer scripts (nothing runs in the image, as
  # in distroless); the hooks (extract hooks: the only ones this variant runs) write the users,
  # link busybox as /bin/sh and drop documentation.
  # shellcheck disable=SC2016 # the hooks' $1 is mmdebstrap's, not ours
  mmdebstrap --quiet --variant=extract --include="$packages" \
    --extract-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" >"$1/etc/passwd"' \
    --extract-hook='printf "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n" >"$1/etc/group"' \
    --extract-hook='mkdir -p "$1/home/nonroot" && chown 65532:65532 "$1/home/nonroot" && chmod 1777 "$1/tmp"' \
    --extract-hook='if [ -x "$1/bin/busybox" ]; then ln -sf busybox "$1/bin/sh"; fi' \
    --extract-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/info "$1"/usr/share/lintian "$1"/usr/share/gdb "$1"/usr/share/gcc' \
    bookworm "$cache/.$flavor-$$.tar"
  mv "$cache/.$flavor-$$.tar" "$tar"
fi
c="$(bah from --quiet scratch)"
bah add --quiet "$c" "$tar" / >/dev/null
bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --user 65532:65532 --workingdir /home/nonroot "$c"
if [ "$flavor" = busybox ]; then bah config --user 0:0 --cmd sh "$c"; fi
bah commit --quiet --rm "$c" "$image" >/dev/null
echo "$image"
