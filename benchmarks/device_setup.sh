# Sourced by the GPU scripts: make `bilalora` (with bilalora.cli/.export/.runtime) importable on the
# lent machine, which has torch but no network. Carried wheels in .whl/ (open_clip, ftfy, wcwidth) are
# installed when present. When an editable install fails (e.g. a setuptools older than pyproject.toml
# needs), cli/, export/ and runtime/ are copied into bilalora/ of the machine's copy of the tree.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pip-install.log 2>&1; then
  # the device works on a copy of the tree: nest cli/, export/, runtime/ into bilalora/ as installed
  for sub in cli export runtime; do [ -e "bilalora/$sub" ] || cp -r "$sub" "bilalora/$sub"; done
  echo "editable install failed (see /tmp/pip-install.log); using the source tree with cli/export/runtime nested"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# `return` when sourced (the caller records the failure), `exit` when run directly
python3 -c "import bilalora.cli.app, bilalora.runtime, bilalora.export" || { echo "bilalora is not importable"; return 3 2>/dev/null || exit 3; }
