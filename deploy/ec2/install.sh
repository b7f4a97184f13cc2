#!/usr/bin/env bash
# Install avsr-pipeline on an EC2 instance (Ubuntu 22.04 or 24.04) as systemd services.
# Run from a checkout of the repository, as root; running it again is safe (it upgrades the code
# and the venv, never overwrites /etc/avsr/avsr.env, and restarts nothing by itself):
#
#   sudo AVSR_WORK_BUCKET=my-avsr-work deploy/ec2/install.sh
#
# Environment:
#   AVSR_ROLE         all (default): redis-server, API, Flower, CPU workers and one GPU worker per
#                     GPU on this host; cpu-worker: CPU workers only (Redis and S3 elsewhere, no
#                     GPU needed); gpu-worker: GPU workers only.
#   AVSR_CPU_WORKERS  number of avsr-cpu-worker@N units (default 2; each runs 2 processes)
#   AVSR_WORK_BUCKET  written into a new /etc/avsr/avsr.env
#   TORCH_INDEX_URL   where the torch wheel comes from (default: the CUDA 12.8 build); a
#                     cpu-worker host installs no torch at all
# The venv gets the extras of pyproject.toml that the host's processes need: all → api,cpu,gpu,flower;
# cpu-worker → cpu; gpu-worker → gpu.
set -euo pipefail

ROLE="${AVSR_ROLE:-all}"
CPU_WORKERS="${AVSR_CPU_WORKERS:-2}"
PREFIX=/opt/avsr
APP_DIR="${PREFIX}/app"
VENV="${PREFIX}/venv"
MODELS_DIR="${PREFIX}/models"
ENV_DIR=/etc/avsr
ENV_FILE="${ENV_DIR}/avsr.env"
UNIT_DIR=/etc/systemd/system
SERVICE_USER=avsr
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

case "${ROLE}" in
  all) NEED_GPU=1; EXTRAS=api,cpu,gpu,flower ;;
  gpu-worker) NEED_GPU=1; EXTRAS=gpu ;;
  cpu-worker) NEED_GPU=0; EXTRAS=cpu ;;
  *) die "AVSR_ROLE must be all, cpu-worker or gpu-worker (got '${ROLE}')" ;;
esac
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
[[ "${CPU_WORKERS}" =~ ^[0-9]+$ ]] || die "AVSR_CPU_WORKERS must be a number"

[[ "${EUID}" -eq 0 ]] || die "run as root (sudo $0)"
[[ -f "${REPO}/pyproject.toml" && -d "${REPO}/tasks" ]] || die "run from a checkout of avsr-pipeline"

# shellcheck source=/dev/null
. /etc/os-release
if [[ "${ID:-}" != ubuntu || ! "${VERSION_ID:-}" =~ ^(22\.04|24\.04)$ ]]; then
  log "warning: tested on Ubuntu 22.04/24.04, this is ${PRETTY_NAME:-unknown}"
fi

# --- NVIDIA driver ------------------------------------------------------------------------------
GPU_COUNT=0
if [[ "${NEED_GPU}" -eq 1 ]]; then
  command -v nvidia-smi >/dev/null \
    || die "nvidia-smi not found: install the NVIDIA driver first (sudo ubuntu-drivers install, then reboot) or start from an AWS Deep Learning Base GPU AMI"
  nvidia-smi -L >/dev/null || die "nvidia-smi cannot talk to the driver (reboot after installing it?)"
  GPU_COUNT="$(nvidia-smi -L | grep -c '^GPU ' || true)"
  [[ "${GPU_COUNT}" -ge 1 ]] || die "no GPU visible to nvidia-smi"
  log "NVIDIA driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1), ${GPU_COUNT} GPU(s)"
fi

# --- system packages ----------------------------------------------------------------------------
log "system packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-cache policy python3.11 | grep -q 'Candidate: [0-9]' || ! apt-cache policy python3.11-venv | grep -q 'Candidate: [0-9]'; then
  apt-get install -y -qq software-properties-common
  add-apt-repository -y ppa:deadsnakes/ppa
  apt-get update -qq
fi
packages=(python3.11 python3.11-venv ca-certificates curl openssl rsync libgomp1 libstdc++6 zlib1g)
[[ "${ROLE}" == all ]] && packages+=(redis-server)
apt-get install -y -qq --no-install-recommends "${packages[@]}"

# --- user and directories -----------------------------------------------------------------------
if ! id -u "${SERVICE_USER}" >/dev/null 2>&1; then
  log "user ${SERVICE_USER}"
  useradd --system --home-dir /var/lib/avsr --no-create-home --shell /usr/sbin/nologin "${SERVICE_USER}"
fi
install -d -m 0755 "${PREFIX}" "${APP_DIR}" "${MODELS_DIR}"
install -d -m 0750 -o root -g "${SERVICE_USER}" "${ENV_DIR}"

# --- code and venv ------------------------------------------------------------------------------
log "code -> ${APP_DIR}"
for package in api tasks cpu_worker gpu_worker; do
  rsync -a --delete --exclude '__pycache__' "${REPO}/${package}/" "${APP_DIR}/${package}/"
done
install -m 0644 "${REPO}/pyproject.toml" "${REPO}/README.md" "${APP_DIR}/"

log "venv ${VENV}: the extras ${EXTRAS} of pyproject.toml"
[[ -x "${VENV}/bin/python" ]] || python3.11 -m venv "${VENV}"
"${VENV}/bin/pip" install --quiet --upgrade pip
if [[ "${NEED_GPU}" -eq 1 ]]; then
  TORCH_PIN="$(grep -oE '"torch==[^"]+"' "${REPO}/pyproject.toml" | tr -d '"' | head -n1)"
  [[ -n "${TORCH_PIN}" ]] || die "pyproject.toml pins no torch version"
  log "${TORCH_PIN} from ${TORCH_INDEX_URL} first"
  "${VENV}/bin/pip" install --quiet --index-url "${TORCH_INDEX_URL}" "${TORCH_PIN}"
fi
"${VENV}/bin/pip" install --quiet "${APP_DIR}[${EXTRAS}]"
if [[ "${NEED_GPU}" -eq 1 ]]; then
  "${VENV}/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "torch in ${VENV} does not see CUDA (driver too old for ${TORCH_INDEX_URL}?)"
fi

# --- Redis (broker, results, job records): AOF, localhost only ------------------------------------
if [[ "${ROLE}" == all ]]; then
  log "redis-server: appendonly yes, appendfsync everysec"
  conf=/etc/redis/redis.conf
  set_conf() {  # set_conf KEY VALUE: rewrite the active directive (the last one wins), else append
    if grep -qE "^$1 " "${conf}"; then
      sed -i -E "s/^$1 .*/$1 $2/" "${conf}"
    else
      printf '%s %s\n' "$1" "$2" >>"${conf}"
    fi
  }
  set_conf appendonly yes
  set_conf appendfsync everysec
  systemctl enable --now redis-server
  # Turn AOF on in the running server as well: it rewrites the AOF from the data it holds
  # (a restart with a fresh `appendonly yes` would otherwise start from an empty AOF).
  redis-cli CONFIG SET appendonly yes >/dev/null
fi

# --- configuration ------------------------------------------------------------------------------
if [[ ! -f "${ENV_FILE}" ]]; then
  log "new ${ENV_FILE} (API key, Flower password and callback secret generated)"
  tmp="$(mktemp)"
  cp "${HERE}/avsr.env.example" "${tmp}"
  sed -i "s|^AVSR_API_KEYS=__GENERATED__|AVSR_API_KEYS=$(openssl rand -hex 32)|" "${tmp}"
  sed -i "s|^FLOWER_BASIC_AUTH=admin:__GENERATED__|FLOWER_BASIC_AUTH=admin:$(openssl rand -hex 16)|" "${tmp}"
  sed -i "s|^AVSR_CALLBACK_SECRET=__GENERATED__|AVSR_CALLBACK_SECRET=$(openssl rand -hex 32)|" "${tmp}"
  if [[ -n "${AVSR_WORK_BUCKET:-}" ]]; then
    sed -i "s|^AVSR_WORK_BUCKET=.*|AVSR_WORK_BUCKET=${AVSR_WORK_BUCKET}|" "${tmp}"
  fi
  install -m 0640 -o root -g "${SERVICE_USER}" "${tmp}" "${ENV_FILE}"
  rm -f "${tmp}"
else
  log "keeping ${ENV_FILE}"
  missing="$(comm -23 <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "${HERE}/avsr.env.example" | sort) \
                      <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "${ENV_FILE}" | sort))"
  [[ -z "${missing}" ]] || log "note: ${ENV_FILE} lacks (code defaults apply): ${missing//$'\n'/ }"
fi
grep -q '^AVSR_WORK_BUCKET=CHANGE-ME' "${ENV_FILE}" && log "warning: set AVSR_WORK_BUCKET in ${ENV_FILE}"

# --- systemd units --------------------------------------------------------------------------------
log "systemd units"
for unit in "${HERE}"/*.service "${HERE}"/avsr.target; do
  install -m 0644 "${unit}" "${UNIT_DIR}/$(basename "${unit}")"
done
systemctl daemon-reload
systemctl enable avsr.target

units=()
if [[ "${ROLE}" == all ]]; then
  units+=(avsr-api.service avsr-flower.service)
fi
if [[ "${ROLE}" == all || "${ROLE}" == cpu-worker ]]; then
  for ((i = 1; i <= CPU_WORKERS; i++)); do units+=("avsr-cpu-worker@${i}.service"); done
fi
gpu_units=()
if [[ "${NEED_GPU}" -eq 1 ]]; then
  for ((i = 0; i < GPU_COUNT; i++)); do gpu_units+=("avsr-gpu-worker@${i}.service"); done
fi

model_path="$(sed -n 's/^AVHUBERT_MODEL_PATH=//p' "${ENV_FILE}")"
if [[ "${#gpu_units[@]}" -gt 0 && ! -r "${model_path}" ]]; then
  log "model ${model_path:-?} not found: GPU workers enabled but not started; copy it and run"
  log "  systemctl start ${gpu_units[*]}"
  systemctl enable "${gpu_units[@]}"
else
  units+=("${gpu_units[@]}")
fi
if [[ "${#units[@]}" -gt 0 ]]; then
  systemctl enable --now "${units[@]}"
fi

log "done. Status: systemctl list-units 'avsr*'  Logs: journalctl -u 'avsr*' -f"
log "new code or settings take effect on: systemctl restart avsr.target (workers finish their task first)"
