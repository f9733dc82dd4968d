#!/usr/bin/env bash
# COCO val2017 images and the official COCO-Stuff stuff+things label maps, laid out the way
# conf/data/coco.yaml and the cocostuff27 preset expect:
#
#   DEST/val2017/000000000139.jpg ...                              (5,000 images, ~0.8 GB)
#   DEST/stuffthingmaps_trainval2017/val2017/000000000139.png ...  (label maps: COCO id - 1, 255 = unlabelled)
#
#   bash experiments/download_coco.sh [DEST]        # DEST defaults to data/coco (`make data`)
#
# Needs internet, curl or wget, and unzip. The label archive (~0.7 GB) also holds train2017's maps;
# only val2017's are extracted. Re-running skips what is already there; archives are deleted
# after extraction unless KEEP_ZIPS=1.
set -euo pipefail
DEST=${1:-data/coco}
IMAGES_URL=http://images.cocodataset.org/zips/val2017.zip
LABELS_URL=http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip

die() { echo "download_coco.sh: error: $*" >&2; exit 1; }
command -v unzip >/dev/null || die "'unzip' is not installed (e.g. apt-get install unzip)."
if command -v curl >/dev/null; then
  fetch() { curl -fL --retry 3 -o "$2" "$1"; }
elif command -v wget >/dev/null; then
  fetch() { wget -O "$2" "$1"; }
else
  die "neither 'curl' nor 'wget' is installed; install one, or download $IMAGES_URL and $LABELS_URL by hand into $DEST."
fi

download() {  # URL FILE: fetch to FILE.part, then rename (an interrupted download is not mistaken for a whole one)
  [ -f "$2" ] && return 0
  fetch "$1" "$2.part" || die "could not download $1 (is there internet access?)."
  mv -f "$2.part" "$2"
}

mkdir -p "$DEST"
count() { find "$1" -maxdepth 1 -type f -name "$2" 2>/dev/null | wc -l; }

# 1. images -> DEST/val2017/*.jpg
if [ "$(count "$DEST/val2017" '*.jpg')" -ge 5000 ]; then
  echo "images: $DEST/val2017 already has $(count "$DEST/val2017" '*.jpg') images"
else
  download "$IMAGES_URL" "$DEST/val2017.zip"
  unzip -q -o "$DEST/val2017.zip" -d "$DEST"          # the archive holds val2017/
  [ "${KEEP_ZIPS:-0}" = 1 ] || rm -f "$DEST/val2017.zip"
fi

# 2. labels -> DEST/stuffthingmaps_trainval2017/val2017/*.png
LABELS="$DEST/stuffthingmaps_trainval2017"
if [ "$(count "$LABELS/val2017" '*.png')" -ge 5000 ]; then
  echo "labels: $LABELS/val2017 already has $(count "$LABELS/val2017" '*.png') maps"
else
  ZIP="$DEST/stuffthingmaps_trainval2017.zip"
  download "$LABELS_URL" "$ZIP"
  mkdir -p "$LABELS"
  unzip -q -o "$ZIP" '*val2017/*' -d "$LABELS"        # the archive holds train2017/ and val2017/
  if [ ! -d "$LABELS/val2017" ]; then                 # tolerate an extra top-level folder
    found=$(find "$LABELS" -type d -name val2017 | head -n 1)
    [ -n "$found" ] || die "no val2017/ folder inside $ZIP."
    mv "$found" "$LABELS/val2017"
  fi
  [ "${KEEP_ZIPS:-0}" = 1 ] || rm -f "$ZIP"
fi

echo "images: $(count "$DEST/val2017" '*.jpg') in $DEST/val2017"
echo "labels: $(count "$LABELS/val2017" '*.png') in $LABELS/val2017"
echo "next:   python -m ldsc.run experiment=cocostuff27   (or bash experiments/cocostuff_table.sh)"
