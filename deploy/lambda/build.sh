#!/usr/bin/env bash
# Package the submitter: dist/avsr-submit.zip with handler.py at its root (stdlib only, no deps).
#   deploy/lambda/build.sh && cd deploy/lambda && sam deploy --guided
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dist="${here}/dist"
zip_path="${dist}/avsr-submit.zip"

mkdir -p "${dist}"
rm -f "${zip_path}"
python3 - "${here}/handler.py" "${zip_path}" <<'PY'
import sys
import zipfile

source, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    info = zipfile.ZipInfo("handler.py", date_time=(2020, 1, 1, 0, 0, 0))  # reproducible bytes
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(source, "rb") as handle:
        archive.writestr(info, handle.read())
PY
echo "${zip_path}"
