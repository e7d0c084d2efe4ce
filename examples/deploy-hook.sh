#!/usr/bin/env bash
# Post-deploy hook: clean up RQ jobs that the worker restart left stuck in `started`.
#
# Usage: deploy-hook.sh [POLICY]   (default: the policy next to this script)
#
# Redis comes from the environment: REDIS_URL (or OPSCTL_REDIS_URL) and, for the example
# policy, REDIS_PASSWORD. Any OPSCTL_* variable sets the option it is named after.
# The JSON report goes to $DEPLOY_HOOK_REPORT, or to a new temporary file.
#
# What blocks the deploy (this hook exits non-zero):
#   2  the policy or an option is invalid: a mistake to fix before the next deploy
#   4  a blast-radius limit tripped: far more jobs look stuck than ever should, so a person
#      looks before anything is changed (opsctl changed nothing)
#   130, 143  opsctl was stopped by SIGINT or SIGTERM (the deploy itself is being
#      stopped, most likely): it stopped between two changes; run it again to finish
#   *  anything opsctl does not document
# What only warns (this hook exits 0):
#   1  some actions failed; the report says which, the next run tries again
#   3  Redis was unreachable: the cleanup waits for the next run
#   5  a lock was held: another opsctl run (doing the cleanup), or RQ's own lock of a
#      queue (its jobs wait for the next run; the report says which)
#   6  the cleanup succeeded but --metrics-file could not be written (not used here)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
policy="${1:-$here/policy.yaml}"
report="${DEPLOY_HOOK_REPORT:-$(mktemp -t opsctl-report.XXXXXX)}"

opsctl apply "$policy" --format json >"$report"
rc=$?
# A run that ends before it has read Redis (an unreachable server, say) prints no
# report: its reason is on stderr, above.
if [ ! -s "$report" ]; then
  report="none; see the message above"
fi

case "$rc" in
  0)
    echo "opsctl: stuck jobs cleaned up (report: $report)"
    exit 0
    ;;
  1 | 3 | 5 | 6)
    echo "opsctl: warning: exit $rc; the deploy goes on (report: $report)" >&2
    exit 0
    ;;
  2)
    echo "opsctl: the policy or an option is invalid; fix it before deploying" >&2
    exit 2
    ;;
  4)
    echo "opsctl: a blast-radius limit tripped and nothing was done; look at $report" >&2
    exit 4
    ;;
  130 | 143)
    echo "opsctl: stopped by a signal between two changes; run it again to finish" >&2
    exit "$rc"
    ;;
  *)
    echo "opsctl: unexpected exit $rc; stopping the deploy" >&2
    exit "$rc"
    ;;
esac
