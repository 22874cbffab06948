#!/bin/sh
# Least privilege for the stages: a dedicated MinIO user whose policy covers ONLY the artifact bucket.
#
# Run by the compose deployment's one-shot bucket-init service (image minio/mc), after the bucket
# exists, with the root credentials that only this service and MinIO itself ever see:
#
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   MinIO's root account (used here, never given to a stage)
#   DERMAOPS_BUCKET                       the artifact bucket (default dermaops)
#   DERMAOPS_S3_ACCESS_KEY                the stages' access key id (e.g. dermaops-stages)
#   DERMAOPS_S3_SECRET_KEY                its secret (>= 8 characters; from .env, never baked in)
#   MINIO_URL                             default http://minio:9000
#   POLICY_FILE                           default /policy/dermaops-bucket-policy.json
#
# Idempotent: re-running updates the user's secret and the policy to what .env says now.
# The stages then get DERMAOPS_S3_ACCESS_KEY / DERMAOPS_S3_SECRET_KEY as AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY (the dermaops_s3 connection), never MINIO_ROOT_*.
set -eu

: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
: "${DERMAOPS_S3_ACCESS_KEY:?set DERMAOPS_S3_ACCESS_KEY (the stages own access key)}"
: "${DERMAOPS_S3_SECRET_KEY:?set DERMAOPS_S3_SECRET_KEY (the stages own secret key)}"
BUCKET="${DERMAOPS_BUCKET:-dermaops}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY_FILE="${POLICY_FILE:-/policy/dermaops-bucket-policy.json}"
POLICY_NAME="dermaops-${BUCKET}-rw"

if [ "$DERMAOPS_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
  echo "minio-least-privilege: DERMAOPS_S3_ACCESS_KEY must differ from MINIO_ROOT_USER" >&2
  exit 2
fi

mc alias set dermaops "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "dermaops/$BUCKET"

# The policy names the bucket; everything else (other buckets, admin APIs) stays denied.
policy="$(mktemp)"
sed "s/\${DERMAOPS_BUCKET}/$BUCKET/g" "$POLICY_FILE" >"$policy"
mc admin policy create dermaops "$POLICY_NAME" "$policy"
rm -f "$policy"

# `user add` on an existing user sets its secret, so a rotated secret in .env takes effect on re-run.
mc admin user add dermaops "$DERMAOPS_S3_ACCESS_KEY" "$DERMAOPS_S3_SECRET_KEY"
# attach fails when the policy is already attached; that is the state we want.
mc admin policy attach dermaops "$POLICY_NAME" --user "$DERMAOPS_S3_ACCESS_KEY" 2>/dev/null ||
  mc admin policy entities dermaops --user "$DERMAOPS_S3_ACCESS_KEY" | grep -q "$POLICY_NAME"
echo "minio-least-privilege: user $DERMAOPS_S3_ACCESS_KEY may use only s3://$BUCKET (policy $POLICY_NAME)"
