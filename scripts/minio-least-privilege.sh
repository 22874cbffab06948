#!/bin/sh
# Least privilege for the stages: one MinIO user per S3 role, each with its role's policy only.
#
# Run by the compose deployment's one-shot bucket-init service (image minio/mc), after MinIO is up, with
# the root credentials that only this service and MinIO itself ever see:
#
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   MinIO's root account (used here, never given to a stage)
#   DERMAOPS_BUCKET                       the artifact bucket (default dermaops)
#   POLICY_DIR                            the roles' policies, <role>.json (default /policy: the stage
#                                         package's tasks/dermaops/policies, see tasks/dermaops/access.py)
#   DERMAOPS_S3_<ROLE>_SECRET_KEY         each role's secret (8-40 characters; from .env, never baked in)
#   MINIO_URL                             default http://minio:9000
#
# For each role: the policy dermaops-<bucket>-<role> (the bucket substituted for ${DERMAOPS_BUCKET}), the
# user dermaops-<role> with that secret, and the policy attached. A stage gets its role's key through the
# Airflow connection dermaops_s3_<role> (docker-compose.yaml); train's key, for one, cannot write registry/.
#
# Idempotent: re-running updates every user's secret and every policy to what .env and the files say now.
set -eu

: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
BUCKET="${DERMAOPS_BUCKET:-dermaops}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY_DIR="${POLICY_DIR:-/policy}"

mc alias set dermaops "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "dermaops/$BUCKET"

roles=""
for file in "$POLICY_DIR"/*.json; do
  [ -e "$file" ] || { echo "minio-least-privilege: no policies in $POLICY_DIR" >&2; exit 2; }
  role="${file##*/}"
  role="${role%.json}"
  name="$(echo "$role" | tr '[:lower:]' '[:upper:]')"
  secret="$(eval "printf %s \"\${DERMAOPS_S3_${name}_SECRET_KEY:-}\"")"
  if [ -z "$secret" ]; then
    echo "minio-least-privilege: set DERMAOPS_S3_${name}_SECRET_KEY (the $role role's secret) in .env" >&2
    exit 2
  fi
  user="dermaops-$role"
  policy_name="dermaops-$BUCKET-$role"

  # The policy names the bucket; everything else (other buckets, admin APIs) stays denied.
  policy="$(mktemp)"
  sed "s/\${DERMAOPS_BUCKET}/$BUCKET/g" "$file" >"$policy"
  mc admin policy create dermaops "$policy_name" "$policy" >/dev/null
  rm -f "$policy"
  # `user add` on an existing user sets its secret, so a rotated secret in .env takes effect on re-run.
  mc admin user add dermaops "$user" "$secret" >/dev/null
  # attach fails when the policy is already attached; that is the state we want.
  mc admin policy attach dermaops "$policy_name" --user "$user" >/dev/null 2>&1 ||
    mc admin policy entities dermaops --user "$user" | grep -q "$policy_name"
  roles="$roles $role"
done
echo "minio-least-privilege: s3://$BUCKET users, each writing only its role's prefixes:$roles"
