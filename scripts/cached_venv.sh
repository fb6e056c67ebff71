# Sourced by scripts/cuda_gate.sh and scripts/test_compat.sh: a multi-GB venv cached under
# ~/.cache/metaembed-kernels, reused while it holds what is asked for.
#
#   cached_venv VENV CHECK_PY PACKAGE...
#
# VENV is reused when `VENV/bin/python -c CHECK_PY` succeeds. Otherwise it is rebuilt in
# VENV.partial and renamed into place only once complete and checked, so an interrupted
# download never leaves a half venv to reuse; a lock (VENV.lock) serialises two jobs that
# share the cache. Prints how long the install took and the venv's size.
cached_venv() {
  local venv=$1 check=$2
  shift 2
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "   reusing $venv"
  else
    local tmp="$venv.partial" start
    start=$(date +%s)
    echo "   creating $venv: pip install $*"
    rm -rf "$tmp"
    python3 -m venv "$tmp"
    # (pip's notes about this machine's empty extra index folders are filtered out)
    "$tmp/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$@" </dev/null 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    if ! "$tmp/bin/python" -c "$check"; then
      echo "   $tmp does not hold what was asked for ($*)"
      flock -u 9
      return 1
    fi
    rm -rf "$venv"
    mv "$tmp" "$venv"  # used as `python -m ...` only: a venv moved whole keeps working
    echo "   installed in $(($(date +%s) - start)) s ($(du -sh "$venv" | cut -f1))"
  fi
  flock -u 9
}
