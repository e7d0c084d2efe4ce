"""Which RQ release wrote a job, and the writes that release expects after a failure.

opsctl supports data written by RQ 1.16 up to 3.x, also all at once in one Redis
during a rolling upgrade, so it decides per job, never with a global switch:

- a started-registry member that is a bare job id was written by RQ 1; RQ 2 and
  later write ``job_id:execution_id`` and keep execution hashes;
- otherwise the ``version`` field of the hash of the worker that ran the job
  tells RQ 2 from RQ 3; when that hash is gone, the job is taken as RQ 3's.

The one step where the releases differ in what opsctl must write is releasing
the dependents of a job opsctl failed. RQ 3 moves them through its
``ReadyJobRegistry`` (status ``ready_to_enqueue``), which RQ 1 and 2 do not know
and never drain; RQ 1 and 2 enqueue them in one step. For jobs of those releases
opsctl therefore does that one step itself, atomically, with their rules.
"""

from __future__ import annotations

import redis

from opsctl.keys import Keys
from opsctl.model import StartedEntry, format_timestamp, parse_int

#: Releases the data of a job can come from.
SUPPORTED_MAJORS = (1, 2, 3)

_RELEASE_SCRIPT = """
local prefix, parent, now_iso = ARGV[1], ARGV[2], ARGV[3]
local function kind_of(key)
  local found = redis.call('TYPE', key)
  if type(found) == 'table' then found = found['ok'] end
  return found
end
if redis.acl_check_cmd then
  local probe = prefix .. ':job:-'
  for _, w in ipairs({{'HSET', probe, 'f', 'v'}, {'ZREM', prefix .. ':deferred:-', 'm'},
                      {'RPUSH', prefix .. ':queue:-', 'v'}, {'LPUSH', prefix .. ':queue:-', 'v'},
                      {'SADD', prefix .. ':queues', 'm'}, {'SREM', KEYS[1], 'm'}}) do
    if not redis.acl_check_cmd(unpack(w)) then
      return redis.error_reply('NOPERM the Redis user may not run ' .. w[1] .. ' on ' .. w[2])
    end
  end
end
if kind_of(KEYS[1]) ~= 'set' then return {0, 0} end
local parent_status = redis.call('HGET', prefix .. ':job:' .. parent, 'status')
local released, kept = 0, 0
for _, dep in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = prefix .. ':job:' .. dep
  local ready = kind_of(key) == 'hash'
  local f = {}
  if ready then
    f = redis.call('HMGET', key, 'status', 'origin', 'allow_dependency_failures',
                   'enqueue_at_front')
    ready = f[1] and f[2] and f[1] ~= 'canceled'
  end
  local allow = ready and f[3] == '1'
  -- The parent just failed: only a dependent that allows failures may go on.
  if ready and (parent_status ~= 'failed' or not allow) then ready = false end
  if ready then
    local deps_key = prefix .. ':job::' .. dep .. ':dependencies'
    if kind_of(deps_key) == 'set' then
      for _, other in ipairs(redis.call('SMEMBERS', deps_key)) do
        if other ~= parent then
          local s = redis.call('HGET', prefix .. ':job:' .. other, 'status')
          if s and s ~= 'finished' and s ~= 'failed' then ready = false end
        end
      end
    end
  end
  local queue_key = ready and (prefix .. ':queue:' .. f[2])
  if ready and kind_of(queue_key) ~= 'none' and kind_of(queue_key) ~= 'list' then
    ready = false
  end
  if ready then
    redis.call('ZREM', prefix .. ':deferred:' .. f[2], dep)
    redis.call('HSET', key, 'status', 'queued', 'enqueued_at', now_iso)
    if f[4] == '1' then
      redis.call('LPUSH', queue_key, dep)
    else
      redis.call('RPUSH', queue_key, dep)
    end
    redis.call('SADD', prefix .. ':queues', queue_key)
    redis.call('SREM', KEYS[1], dep)
    released = released + 1
  else
    kept = kept + 1
  end
end
return {released, kept}
"""


def owner_major(conn: redis.Redis, keys: Keys, entry: StartedEntry) -> int:
    """The major RQ release whose data ``entry`` is (1, 2 or 3)."""
    if entry.execution_id is None:
        return 1
    if entry.worker_name:
        version = conn.hget(keys.worker(entry.worker_name), "version")
        if isinstance(version, bytes):
            major = parse_int(version.decode("ascii", "replace").split(".")[0])
            if major in SUPPORTED_MAJORS:
                return major
    return 3


def release_dependents(conn: redis.Redis, keys: Keys, job_id: str, now: float) -> tuple[int, int]:
    """Enqueue the dependents of failed job ``job_id`` as RQ 1 and 2 do after a failure.

    A dependent goes on when it allows its dependencies to fail, is not canceled,
    and each of its other dependencies has finished or failed; it is taken out of
    its deferred registry, marked queued and pushed on its queue (at the front if
    it asked for that). The others stay deferred. Returns (released, kept).
    """
    script = conn.register_script(_RELEASE_SCRIPT)
    reply = script(
        keys=[keys.dependents(job_id)], args=[keys.prefix, job_id, format_timestamp(now)]
    )
    return int(reply[0]), int(reply[1])
