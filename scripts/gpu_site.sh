# Sourced by the GPU scripts (gpu_bench.sh, gpu_serve_bench.sh): the set-up both need to run
# this source tree on the GPU machine, which has no package registry.

# stratlm_site SITE [EXTRA_PATH]: give the source tree a dist-info in SITE (stratlm's built-in
# plugins are found through its entry points), put the tree, SITE and EXTRA_PATH (if given) on
# PYTHONPATH, and print which GPU this is.
stratlm_site() {
  local site=$1 extra=${2:-}
  mkdir -p "$site"
  python3 - "$site" <<'PY' || return 1
import pathlib, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
info = pathlib.Path(sys.argv[1]) / f"stratlm-{project['version']}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: stratlm\nVersion: {project['version']}\n")
groups = project["entry-points"]
(info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items()))
PY
  export PYTHONPATH="$PWD:$site${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true  # a missing GPU shows in the run itself
}
