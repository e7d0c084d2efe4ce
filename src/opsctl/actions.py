"""Acting on jobs and workers: each change is one atomic server-side script.

Every script first re-checks, inside Redis, that the job is exactly as it was
read: same status, the registry entry still present, no heartbeat since (a
heartbeat means a live worker), same retry count. If anything changed the
script writes nothing and says what changed, and the job is reported as
skipped. Because a script runs atomically, a job is never half-moved: it is
either out of its registry and in its new place, or untouched.

The four policy actions, as a policy names them::

    defaults:
      action: fail      # failed status, FailedJobRegistry, a failure result naming opsctl
    queues:
      - name: reports-*
        action: requeue # back on its queue as queued; a worker runs it again
      - name: imports
        action: cancel  # canceled status and CanceledJobRegistry
      - name: scratch
        action: delete  # the job and every registry and execution entry of it are gone

Two more act on entries rather than jobs: ``remove-entry`` drops a registry
entry whose job is gone or ended, and ``stop`` asks a live worker to stop a job
(see :func:`send_stop`).
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from opsctl.audit import AUDIT_MAXLEN, AUDIT_STREAM
from opsctl.keys import DEAD_WORKER_TTL_S, DEFAULT_FAILURE_TTL_S, RESCUE_TTL_S, Keys, rescue_key
from opsctl.model import WorkerRecord, format_timestamp
from opsctl.shown import quoted
from opsctl.state import CONNECTION_LOST, unanswered

log = logging.getLogger(__name__)

#: What each action does, for the CLI's help and the JSON report's schema.
JOB_ACTIONS: dict[str, str] = {
    "fail": "mark failed, file in FailedJobRegistry with a reason (retries honoured)",
    "requeue": "put back on its queue as queued",
    "cancel": "mark canceled, file in CanceledJobRegistry",
    "delete": "delete the job and all its registry and execution entries",
    "remove-entry": "remove the started-registry entry only; the job is left as it is",
}

#: Lua that refuses, before the first write, any of ``writes`` (``{command, key
#: index, args...}``) the Redis user may not run: a script stopped by an ACL
#: halfway would leave a job half-moved. Shared by every changing script.
CHECK_WRITES_LUA = """  for _, w in ipairs(writes) do
    local args = {w[1], KEYS[w[2]]}
    for i = 3, #w do table.insert(args, w[i]) end
    if not redis.acl_check_cmd(unpack(args)) then
      return redis.error_reply('NOPERM the Redis user may not run ' .. w[1] .. ' on ' .. KEYS[w[2]])
    end
  end
"""

#: Lua that makes a job wait in its queue again without expiring: a failed or
#: stopped job's hash and sets carry its failure_ttl. The hash expires with the
#: job's own ttl instead, when it has one, as RQ's enqueue sets it; the sets
#: never do (a worker clears the hash's expiry when it starts the job, not the
#: sets', which must last until the job's end releases its dependents). Shared
#: by the requeuing scripts, which call it after other writes, so it must not
#: fail: a ttl that is no whole number of seconds RQ writes (RQ cannot load
#: such a job; "0.5" would expire the hash at once, "inf" would stop the script
#: half-way) counts as none, as -1 does, and so does one too long to expire.
#: ``whole_number`` reads a field as RQ reads a count: plain digits only (never
#: inf, 1e3 or 0x10), at most ``digits`` of them; nil otherwise.
KEEP_WHILE_QUEUED_LUA = """
local function whole_number(text, digits)
  if text and string.match(text, '^[0-9]+$') and #text <= digits then return tonumber(text) end
  return nil
end
local function keep_while_queued(ttl_field, job_key, sets)
  local ttl = whole_number(ttl_field, 15)
  if ttl and ttl > 0 then
    redis.call('EXPIRE', job_key, ttl)
  else
    redis.call('PERSIST', job_key)
  end
  for _, key in ipairs(sets) do redis.call('PERSIST', key) end
end
"""

_JOB_SCRIPT = (
    KEEP_WHILE_QUEUED_LUA
    + """
-- Set when a remove-entry's job key holds something other than a hash
-- (not written by RQ): the entry goes, and that key is never read or written.
local opaque = false
local function field(key, name)
  if opaque and key == KEYS[1] then return '' end
  local v = redis.call('HGET', key, name)
  if v == false then return '' end
  return v
end

local action, member, job_id, exec_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- A lost job (found by the keyspace scan) has no registry entry to match.
local lost = ARGV[19] == '1'
local now_iso, now = ARGV[9], tonumber(ARGV[10])
local known = {fail=1, requeue=1, cancel=1, delete=1, ['remove-entry']=1}
if not known[action] then
  return redis.error_reply('unknown action ' .. action)
end
if action == 'remove-entry' then
  local found = redis.call('TYPE', KEYS[1])
  if type(found) == 'table' then found = found['ok'] end
  opaque = found ~= 'hash' and found ~= 'none'
end

-- Likewise a command the Redis user may not run (ACL): check them all first.
if redis.acl_check_cmd then
  local writes = {
    {'ZREM', 2, 'm'}, {'DEL', 3}, {'ZREM', 4, 'm'}, {'SREM', 5, 'm'}, {'HSET', 1, 'f', 'v'},
    {'RPUSH', 6, 'v'}, {'LPUSH', 6, 'v'}, {'LREM', 6, '0', 'v'}, {'SADD', 7, 'm'},
    {'ZADD', 8, '1', 'm'}, {'ZADD', 9, '1', 'm'}, {'ZADD', 10, '1', 'm'},
    {'XADD', 11, '*', 'f', 'v'}, {'EXPIRE', 1, '1'}, {'PERSIST', 1}, {'DEL', 1},
    {'PERSIST', 11}, {'PERSIST', 12}, {'PERSIST', 13},
    {'INCR', 17}, {'EXPIRE', 17, '1'}, {'XADD', 18, '*', 'f', 'v'},
    {'ZREM', 14, 'm'}, {'ZREM', 15, 'm'}, {'ZREM', 16, 'm'}, {'LREM', 2, '0', 'v'},
  }
  -- Application keys deleted along with the job (policy related_keys).
  for i = 21, #KEYS do table.insert(writes, {'DEL', i}) end
"""
    + CHECK_WRITES_LUA
    + """end

-- Anything that could make a command fail halfway through the script, after
-- earlier writes, is checked before the first write, so a job is never
-- half-moved: numbers that must parse, and the type of every key written.
local ttl, interval, left = tonumber(ARGV[11]), tonumber(ARGV[14]), tonumber(ARGV[8])
local retrying = action == 'fail' and ARGV[14] ~= ''
if not ttl or not tonumber(ARGV[17]) or (retrying and not (interval and left)) then
  return redis.error_reply('a number this change needs cannot be read')
end
-- A stranded job's source is its queue's intermediate list (KEYS[19]), not a registry.
local stranded = KEYS[2] == KEYS[19]
local kinds = {[1] = 'hash', [2] = 'zset', [18] = 'stream'}
if opaque then kinds[1] = nil end
if stranded then kinds[2], kinds[16] = 'list', 'zset' end
if exec_id ~= '' then kinds[3], kinds[4], kinds[5] = 'hash', 'zset', 'set' end
if retrying and interval > 0 then
  kinds[10] = 'zset'
elseif retrying or action == 'requeue' then
  kinds[6], kinds[7] = 'list', 'set'
  if action == 'requeue' then kinds[17] = 'string' end
elseif action == 'fail' then
  kinds[8], kinds[11] = 'zset', 'stream'
elseif action == 'cancel' then
  kinds[9] = 'zset'
elseif action == 'delete' then
  kinds[4], kinds[6] = 'zset', 'list'
  for _, i in ipairs({8, 9, 10, 14, 15, 16}) do kinds[i] = 'zset' end
end
local function kind_of(key)
  local found = redis.call('TYPE', key)
  if type(found) == 'table' then found = found['ok'] end
  return found
end
if lost then
  kinds[4], kinds[6], kinds[19] = 'zset', 'list', 'list'
  for _, i in ipairs({8, 9, 10, 14, 15, 16}) do kinds[i] = 'zset' end
end
if action == 'delete' then kinds[20] = 'zset' end
for i, kind in pairs(kinds) do
  local found = kind_of(KEYS[i])
  if found ~= 'none' and found ~= kind then
    return redis.error_reply(KEYS[i] .. ' holds a ' .. found .. ', not a ' .. kind)
  end
end
-- opsctl's count of requeues, which INCR must be able to read (Redis reads
-- no sign, no leading zero and no more than 19 digits).
if kinds[17] then
  local count = redis.call('GET', KEYS[17])
  local readable = count == '0' or (string.match(count or '', '^[1-9]%d*$') and #count < 16)
  if count and not readable then
    return redis.error_reply(KEYS[17] .. ' holds something other than a count of requeues')
  end
end

-- RQ 3 names a job's concurrency limit in the job itself: <prefix>:rl:<name>,
-- with :allowed (the jobs holding a slot) and :rate_limited (those waiting).
-- A job that ends here gives its slot back (see release_slot below): every
-- key that touches is checked now, as the keys above are.
local limit = nil
local limit_name = field(KEYS[1], 'rate_limit_key')  -- '' for an opaque key, never read
if limit_name ~= '' then limit = ARGV[16] .. ':rl:' .. limit_name end
local function may(...)
  return not redis.acl_check_cmd or redis.acl_check_cmd(...)
end
local releases = action == 'cancel' or action == 'delete' or (action == 'fail' and not retrying)
if limit and releases then
  local allowed, waiting = limit .. ':allowed', limit .. ':rate_limited'
  local limit_kinds = {[limit] = 'hash', [allowed] = 'zset', [waiting] = 'zset'}
  for key, kind in pairs(limit_kinds) do
    local found = kind_of(key)
    if found ~= 'none' and found ~= kind then
      return redis.error_reply(key .. ' holds a ' .. found .. ', not a ' .. kind)
    end
  end
  for _, key in ipairs({allowed, waiting}) do
    if not (may('ZREM', key, 'm') and may('ZADD', key, '1', 'm') and may('ZCARD', key)
        and may('ZRANGE', key, '0', '0')) then
      return redis.error_reply('NOPERM the Redis user may not write ' .. key)
    end
  end
  if not may('HGET', limit, 'concurrency') then
    return redis.error_reply('NOPERM the Redis user may not read ' .. limit)
  end
end

-- Lost jobs: whether a registry or list holds the job after all (then a
-- worker or RQ took it back), in words; false when nothing does.
local function in_started(registry)
  if redis.call('ZSCORE', registry, job_id) ~= false then return true end
  if kind_of(KEYS[4]) == 'zset' then
    for _, e in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
      if redis.call('ZSCORE', registry, job_id .. ':' .. e) ~= false then return true end
    end
  end
  return false
end

local function lost_job_is_held(status)
  if status == 'started' then
    if in_started(KEYS[2]) then return 'the job is in its started registry again' end
    return false
  end
  if redis.call('LPOS', KEYS[6], job_id) ~= false
      or redis.call('LPOS', KEYS[19], job_id) ~= false then
    return 'the job is on its queue again'
  end
  for _, i in ipairs({8, 9, 10, 14, 15, 16}) do
    if redis.call('ZSCORE', KEYS[i], job_id) ~= false then
      return 'the job is in ' .. KEYS[i] .. ' again'
    end
  end
  -- A worker that has just taken the job enters it as job:execution in the
  -- started registry before it marks the job started.
  if in_started(KEYS[16]) then return 'the job is in its started registry now' end
  return false
end

-- ARGV[23] '1': only find out whether the change could be done (the follow-up
-- of a stop, checked before the stop is sent); nothing is re-checked or written.
if ARGV[23] == '1' then return {1, 'could be done'} end

local status = field(KEYS[1], 'status')
if status ~= ARGV[5] then
  if status == '' then status = 'missing' end
  return {0, 'status is now ' .. status}
end
-- A lost job's re-check is that nothing holds it still.
if stranded then
  if redis.call('LPOS', KEYS[2], job_id) == false then
    return {0, 'no longer in the intermediate list'}
  end
  if in_started(KEYS[16]) then return {0, 'the job is in its started registry now'} end
elseif lost then
  local held = lost_job_is_held(status)
  if held then return {0, held} end
elseif redis.call('ZSCORE', KEYS[2], member) == false then
  return {0, 'entry is no longer in its registry'}
end
-- Never delete a job that a scheduler will enqueue again.
if action == 'delete' then
  if redis.call('ZSCORE', KEYS[10], job_id) ~= false then
    return {0, 'a scheduler still refers to it (' .. KEYS[10] .. ')'}
  end
  if redis.call('ZSCORE', KEYS[20], job_id) ~= false then
    return {0, 'a scheduler still refers to it (' .. KEYS[20] .. ')'}
  end
end
-- ARGV[21] '0': the job hash's heartbeat is another run's (a live worker runs
-- the job as another execution), so only the entry's own execution's counts.
if ARGV[21] == '1' and field(KEYS[1], 'last_heartbeat') ~= ARGV[6] then
  return {0, 'job heartbeat changed since it was read: a worker is alive'}
end
-- A record that expired since it was read was renewed by no one: its run's
-- lease ended, which leaves the job as abandoned as it was read (a new run of
-- the job would show in its status, its entry or its heartbeat).
if exec_id ~= '' and field(KEYS[3], 'last_heartbeat') ~= ARGV[7]
    and redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, 'execution heartbeat changed since it was read: a worker is alive'}
end
if field(KEYS[1], 'retries_left') ~= ARGV[8] then
  return {0, 'retries_left changed since it was read'}
end
-- The queue and registries written to are the origin's as read.
if field(KEYS[1], 'origin') ~= ARGV[22] then
  return {0, 'its origin changed since it was read'}
end
-- The worker the verdict rests on: one started again under its name since it
-- was read ("-": not read) may have taken this very job.
if ARGV[20] ~= '-' and ARGV[13] ~= '' then
  local worker_key = ARGV[16] .. ':worker:' .. ARGV[13]
  local birth = ''
  if kind_of(worker_key) == 'hash' then birth = field(worker_key, 'birth') end
  if birth ~= ARGV[20] then
    return {0, 'worker ' .. ARGV[13] .. ' has started again since it was read'}
  end
end

if stranded then
  redis.call('LREM', KEYS[2], 0, job_id)
else
  redis.call('ZREM', KEYS[2], member)
end
if exec_id ~= '' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], exec_id)
  redis.call('SREM', KEYS[5], job_id .. ':' .. exec_id)
end

local function enqueue(at_front)
  redis.call('HSET', KEYS[1], 'status', 'queued', 'enqueued_at', now_iso)
  -- A stopped job's hash and its dependents and dependencies sets carry its
  -- failure_ttl (RQ sets it).
  keep_while_queued(field(KEYS[1], 'ttl'), KEYS[1], {KEYS[12], KEYS[13]})
  if at_front == '1' then
    redis.call('LPUSH', KEYS[6], job_id)
  else
    redis.call('RPUSH', KEYS[6], job_id)
  end
  redis.call('SADD', KEYS[7], KEYS[6])
end

local function act()
  if action == 'remove-entry' then
    return {1, 'removed'}
  elseif action == 'fail' and ARGV[14] ~= '' then
    redis.call('HSET', KEYS[1], 'retries_left', tostring(left - 1))
    if interval > 0 then
      redis.call('HSET', KEYS[1], 'status', 'scheduled')
      redis.call('ZADD', KEYS[10], math.floor(now + interval), job_id)
      return {1, 'scheduled for retry'}
    end
    enqueue(ARGV[15])
    return {1, 'queued for retry'}
  elseif action == 'fail' then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'ended_at', now_iso)
    local score = '+inf'
    if ttl >= 0 then score = tostring(math.floor(now) + ttl) end
    redis.call('ZADD', KEYS[8], score, job_id)
    local entry = {'type', '2', 'worker_name', ARGV[13], 'exc_string', ARGV[12]}
    if exec_id ~= '' then
      table.insert(entry, 'execution_id')
      table.insert(entry, exec_id)
    end
    redis.call('XADD', KEYS[11], 'MAXLEN', '10', '*', unpack(entry))
    if ttl > 0 then
      for _, key in ipairs({KEYS[1], KEYS[11], KEYS[12], KEYS[13]}) do
        redis.call('EXPIRE', key, ttl)
      end
    elseif ttl < 0 then
      -- Kept for ever, results too (an earlier run's may have an expiry).
      for _, key in ipairs({KEYS[1], KEYS[11], KEYS[12], KEYS[13]}) do
        redis.call('PERSIST', key)
      end
    end
    local dependents = 0
    if kind_of(KEYS[12]) == 'set' then dependents = redis.call('SCARD', KEYS[12]) end
    return {1, 'failed', dependents}
  elseif action == 'requeue' then
    redis.call('HSET', KEYS[1], 'started_at', '', 'ended_at', '')
    enqueue('0')
    local count = redis.call('INCR', KEYS[17])
    redis.call('EXPIRE', KEYS[17], tonumber(ARGV[17]))
    return {1, 'queued', 0, count}
  elseif action == 'cancel' then
    redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', now_iso)
    redis.call('ZADD', KEYS[9], math.floor(now), job_id)
    return {1, 'canceled'}
  elseif action == 'delete' then
    for _, other in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
      redis.call('DEL', ARGV[16] .. ':execution:' .. job_id .. ':' .. other)
      redis.call('ZREM', KEYS[16], job_id .. ':' .. other)
    end
    redis.call('LREM', KEYS[6], 0, job_id)
    for _, key in ipairs({KEYS[8], KEYS[9], KEYS[10], KEYS[14], KEYS[15]}) do
      redis.call('ZREM', key, job_id)
    end
    redis.call('DEL', KEYS[1], KEYS[4], KEYS[11], KEYS[12], KEYS[13])
    for i = 21, #KEYS do redis.call('DEL', KEYS[i]) end
    return {1, 'deleted'}
  end
end

-- RQ 3 concurrency limits. A job that ends here (failed, canceled, deleted)
-- gives back its slot in <prefix>:rl:<key>:allowed, and waiting jobs take the
-- free slots oldest first, as RQ does when a job ends: added to allowed,
-- pushed onto their queue, marked queued. A job queued again keeps its slot.
local function release_slot(rl_concurrency)
  local allowed, waiting = limit .. ':allowed', limit .. ':rate_limited'
  redis.call('ZREM', waiting, job_id)
  if redis.call('ZREM', allowed, job_id) == 0 then return end
  -- Read as RQ reads it: a plain whole number (never inf, 1e3 or 0x10, which
  -- would let every waiting job in); otherwise the job's own, else no slot.
  local concurrency = whole_number(redis.call('HGET', limit, 'concurrency'), 9)
  concurrency = concurrency or whole_number(rl_concurrency, 9) or 0
  -- Nothing here may fail (the change is made): a waiting id whose job is no
  -- waiting job leaves the line; one whose job or queue cannot be written (its
  -- queue is no list, or the user may not) stops it, where it is.
  while redis.call('ZCARD', allowed) < concurrency do
    local oldest = redis.call('ZRANGE', waiting, 0, 0)
    if #oldest == 0 then break end
    local id = oldest[1]
    local key = ARGV[16] .. ':job:' .. id
    if not (may('TYPE', key) and may('HMGET', key, 'origin')) then break end
    local f = {false, false, false}
    if kind_of(key) == 'hash' then
      f = redis.call('HMGET', key, 'origin', 'status', 'enqueue_at_front')
    end
    local queue = f[1] and ARGV[16] .. ':queue:' .. f[1]
    if queue and f[2] == 'rate_limited' then
      if not (may('TYPE', queue) and may('LPUSH', queue, id) and may('RPUSH', queue, id)
          and may('HSET', key, 'status', 'queued')) then
        break
      end
      local found = kind_of(queue)
      if found ~= 'none' and found ~= 'list' then break end
    end
    redis.call('ZREM', waiting, id)
    if queue and f[2] == 'rate_limited' then
      redis.call('ZADD', allowed, math.floor(now), id)
      if f[3] == '1' then
        redis.call('LPUSH', queue, id)
      else
        redis.call('RPUSH', queue, id)
      end
      redis.call('HSET', key, 'status', 'queued', 'enqueued_at', now_iso)
    end
  end
end
local rl_concurrency = field(KEYS[1], 'rate_limit_concurrency')

local result = act()
if result[1] == 1 and limit then
  local detail = result[2]
  if detail == 'failed' or detail == 'canceled' or detail == 'deleted' then
    release_slot(rl_concurrency)
  end
end
if result[1] == 1 then
  local entry = {}
  for i = 24, #ARGV do table.insert(entry, ARGV[i]) end
  if result[2] == 'failed' or result[2] == 'canceled' then
    -- What the job's ended_at now holds: opsctl requeue --run compares it to
    -- tell a job still as this run left it from one that ran again since.
    table.insert(entry, 'ended_at')
    table.insert(entry, now_iso)
  end
  table.insert(entry, 'outcome')
  table.insert(entry, 'done')
  table.insert(entry, 'detail')
  table.insert(entry, result[2])
  redis.call('XADD', KEYS[18], 'MAXLEN', '~', ARGV[18], '*', unpack(entry))
end
return result
"""
)

# KEYS: the worker's hash, its executions set (RQ 3), then the sets that register it.
_WORKER_SCRIPT = """
if redis.acl_check_cmd then
  if not redis.acl_check_cmd('HSET', KEYS[1], 'f', 'v')
      or not redis.acl_check_cmd('EXPIRE', KEYS[1], '1') then
    return redis.error_reply('NOPERM the Redis user may not write ' .. KEYS[1])
  end
  if not redis.acl_check_cmd('DEL', KEYS[2]) then
    return redis.error_reply('NOPERM the Redis user may not run DEL on ' .. KEYS[2])
  end
  for i = 3, #KEYS do
    if not redis.acl_check_cmd('SREM', KEYS[i], 'm') then
      return redis.error_reply('NOPERM the Redis user may not run SREM on ' .. KEYS[i])
    end
  end
  -- The run audits the removal afterwards: a user that may not is refused first.
  if not redis.acl_check_cmd('XADD', ARGV[8], '*', 'f', 'v') then
    return redis.error_reply('NOPERM the Redis user may not run XADD on ' .. ARGV[8])
  end
end
local exists = redis.call('EXISTS', KEYS[1])
if tostring(exists) ~= ARGV[3] then
  return {0, 'worker hash changed since it was read'}
end
-- A worker key of another type (something else wrote it) is never read or written.
local hash = false
if exists == 1 then
  local beat = redis.pcall('HGET', KEYS[1], 'last_heartbeat')
  if type(beat) == 'table' and beat.err then
    if string.sub(tostring(beat.err), 1, 9) ~= 'WRONGTYPE' then return beat end
  else
    hash = true
    if beat == false then beat = '' end
    if beat ~= ARGV[2] then
      return {0, 'worker heartbeat changed since it was read: it is alive'}
    end
  end
end
-- A worker started again under this name registers, then subscribes to its
-- command channel: one more listener than when read (ARGV[7]: those of the
-- server's other databases then, which share the channel) is alive.
if redis.call('PUBSUB', 'NUMSUB', ARGV[6])[2] > tonumber(ARGV[7]) then
  return {0, 'its command channel has a subscriber now: it is alive'}
end
local removed = 0
for i = 3, #KEYS do
  removed = removed + redis.call('SREM', KEYS[i], ARGV[1])
end
if removed == 0 then
  return {0, 'no longer registered (removed since it was read)'}
end
if hash and redis.call('HEXISTS', KEYS[1], 'death') == 0 then
  -- Signed with the moment written, so that no later run takes it for a death the
  -- worker recorded itself (RQ's own clean shutdown overwrites the moment alone), and
  -- with the heartbeat it follows: a heartbeat written since, by the worker's own clock,
  -- is told by its change, not by comparing clocks.
  redis.call('HSET', KEYS[1], 'death', ARGV[4], 'death_noted_by', 'opsctl ' .. ARGV[4],
    'death_noted_after', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
end
-- As RQ's own shutdown does: a worker started again under this name must not
-- inherit the executions of this one, as if it ran them.
local executions = redis.call('TYPE', KEYS[2])
if type(executions) == 'table' then executions = executions['ok'] end
if executions == 'set' then
  redis.call('DEL', KEYS[2])
end
return {1, 'removed'}
"""


@dataclass(frozen=True)
class JobChange:
    """One job action, with the state it expects to find.

    ``source`` is the registry the job is taken out of and ``member`` its entry
    there: the started registry and ``job:execution`` normally, the failed
    registry and the bare id for a job a worker has just stopped.
    """

    action: str
    queue: str
    job_id: str
    member: bytes
    execution_id: str | None
    source: str
    expect: dict[str, str]  # status, last_heartbeat, retries_left, origin of the job
    expect_execution_heartbeat: str
    reason: str = ""
    worker: str = ""
    failure_ttl_s: int = DEFAULT_FAILURE_TTL_S
    retry_interval_s: int | None = None  # set: a fail that retries instead
    retry_at_front: bool = False
    audit: tuple[tuple[str, str], ...] = ()  # fields of the audit entry written on success
    # Application keys a delete removes with the job (policy related_keys); other
    # actions never touch them. Kept apart from the rest as keys 21 and on.
    related_keys: tuple[str, ...] = ()
    #: A job the keyspace scan found in no registry: ``member`` is empty, and
    #: the re-check is that nothing holds the job still.
    lost: bool = False
    #: The ``birth`` of ``worker`` as read ('' for none); the change goes ahead
    #: only while it is unchanged. None: not checked.
    worker_birth: str | None = None
    #: False when the job hash's heartbeat is another run's: a live worker runs
    #: the job as another execution than this entry's (see
    #: :func:`opsctl.engine.runs_elsewhere`); the entry's execution heartbeat is
    #: still checked.
    job_heartbeat_checked: bool = True


@dataclass(frozen=True)
class ChangeResult:
    """What a script reported: whether it acted, in words, and the job's dependents."""

    done: bool
    detail: str
    dependents: int = 0
    error: bool = False  # Redis refused or failed the change (not a re-check)
    rescues: int = 0  # how often opsctl has now requeued the job
    #: The server's refusal, when it refused the change as a read-only replica
    #: (a failover demoted it): every later change would be refused too.
    read_only: str | None = None
    #: The server's refusal, when the Redis user may not run a command the change
    #: needs (an ACL): the run then exits as refused, whatever else it did.
    refused: str | None = None
    #: Known done from the audit trail after its reply was lost: ``dependents``
    #: (and what else the reply said) is not known.
    from_audit: bool = False


def failure_text(reason: str) -> str:
    """A failure reason as RQ stores it in a result stream (zlib, then base64)."""
    # Text read from Redis may hold bytes that are not UTF-8 (kept as surrogates).
    data = reason.encode("utf-8", "backslashreplace")
    return base64.b64encode(zlib.compress(data)).decode()


# Sends RQ's stop-job command only if the job is still the run that was read:
# stop-job names a job, not an execution, and a worker stops whatever run of
# that job it has, so a retry or a new run begun since must not get it.
# KEYS: the job hash, the started registry. ARGV: the channel, the command,
# the started_at read, the registry member read.
# Returns {receivers, ''}, or {-1, status now}, {-2, ''} (started again since),
# {-3, ''} (its entry is gone), {-4, worker state} (not busy), {-5, ''} (lease
# not renewed), {-6, ''} (the worker's hash is gone).
_STOP_SCRIPT = """
if redis.acl_check_cmd and not redis.acl_check_cmd('PUBLISH', ARGV[1], ARGV[2]) then
  return redis.error_reply('NOPERM the Redis user may not run PUBLISH on ' .. ARGV[1])
end
local job = redis.call('HMGET', KEYS[1], 'status', 'started_at')
if job[1] ~= 'started' then return {-1, job[1] or ''} end
if (job[2] or '') ~= ARGV[3] then return {-2, ''} end
local lease = redis.call('ZSCORE', KEYS[2], ARGV[4])
if not lease then return {-3, ''} end
-- A stop that finds no work horse makes RQ's worker kill its own process group:
-- none is sent to a worker that is not busy, nor for a run whose lease it no
-- longer renews (see opsctl.engine.runs_a_job and the lease rule of _held), nor
-- to a worker whose hash has expired since it was read: a worker watching a
-- work horse renews it with every heartbeat (see engine.watched_since_start).
local kind = redis.call('TYPE', KEYS[3])
if type(kind) == 'table' then kind = kind['ok'] end
if kind == 'none' then return {-6, ''} end
if kind == 'hash' then
  local state = redis.call('HGET', KEYS[3], 'state')
  if state and state ~= '' and state ~= 'busy' then return {-4, state} end
end
local score = tonumber(lease)
if score and score < tonumber(ARGV[5]) then return {-5, ''} end
return {redis.call('PUBLISH', ARGV[1], ARGV[2]), ''}
"""


@dataclass(frozen=True)
class StopSent:
    """What became of one stop: how many listeners received it, or why it was not sent."""

    receivers: int
    not_sent: str | None = None


class Actor:
    """Runs the atomic scripts against one Redis, in pipelined batches."""

    def __init__(self, conn: redis.Redis, keys: Keys) -> None:
        self.conn = conn
        self.keys = keys
        self._job_script = conn.register_script(_JOB_SCRIPT)
        self._worker_script = conn.register_script(_WORKER_SCRIPT)
        self._stop_script = conn.register_script(_STOP_SCRIPT)

    def apply_jobs(
        self,
        changes: Sequence[JobChange],
        now: float,
        batch: int = 200,
        between_batches: Callable[[], None] | None = None,
        check_only: bool = False,
    ) -> list[ChangeResult | None]:
        """Run ``changes``; one result each, in order.

        A Redis error fails only its job. If the connection drops, the results
        of the batch in flight and of every later change are None: unknown for
        the batch (each script ran whole or not at all), not attempted after it.
        With ``check_only``, nothing is written: each result says whether the
        change could be done (the user's rights, the types of the keys it writes,
        the numbers it reads), whatever the job's state.
        """
        results: list[ChangeResult | None] = []
        for start in range(0, len(changes), batch):
            if between_batches and start:
                try:
                    between_batches()
                except CONNECTION_LOST as exc:
                    log.warning("connection_lost during=actions error=%s", exc)
                    unanswered(exc)  # noted, as below
                    return results + [None] * (len(changes) - len(results))
            chunk = changes[start : start + batch]
            pipe = self.conn.pipeline(transaction=False)
            for change in chunk:
                keys, args = self._job_call(change, now, check_only)
                self._job_script(keys=keys, args=args, client=pipe)
            try:
                replies = pipe.execute(raise_on_error=False)
            except CONNECTION_LOST as exc:
                log.warning("connection_lost during=actions error=%s", exc)
                unanswered(exc)  # noted: a server that gave no answer is not waited for
                results.extend([None] * (len(changes) - len(results)))
                return results
            results.extend(_result(reply) for reply in replies)
        return results

    def _job_call(
        self, change: JobChange, now: float, check_only: bool = False
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        job, origin = change.job_id, change.queue
        execution = k.execution(job, change.execution_id or "-")
        keys = [
            k.job(job),
            change.source,
            execution,
            k.executions(job),
            k.worker_executions(change.worker or "-"),
            k.queue(origin),
            k.queues,
            k.failed(origin),
            k.canceled(origin),
            k.scheduled(origin),
            k.results(job),
            k.dependents(job),
            k.dependencies(job),
            k.finished(origin),
            k.deferred(origin),
            k.started(origin),
            rescue_key(k.prefix, job),
            AUDIT_STREAM,
            # 19 and 20: a lost job's re-check and the scheduler check of a delete.
            k.intermediate(origin),
            k.scheduler_jobs,
        ]
        if change.action == "delete":
            keys += list(change.related_keys)
        interval = change.retry_interval_s
        args: list[Any] = [
            change.action,
            change.member,
            job,
            change.execution_id or "",
            change.expect.get("status", ""),
            change.expect.get("last_heartbeat", ""),
            change.expect_execution_heartbeat,
            change.expect.get("retries_left", ""),
            format_timestamp(now),
            repr(now),
            change.failure_ttl_s,
            failure_text(change.reason),
            change.worker,
            "" if interval is None else interval,
            "1" if change.retry_at_front else "0",
            self.keys.prefix,
            RESCUE_TTL_S,
            AUDIT_MAXLEN,
            "1" if change.lost else "0",
            "-" if change.worker_birth is None else change.worker_birth,
            "1" if change.job_heartbeat_checked else "0",
            change.expect.get("origin", ""),
            "1" if check_only else "0",
        ]
        for name, value in change.audit:
            args += [name, value]
        return keys, args

    def deregister_worker(self, worker: WorkerRecord, now: float) -> ChangeResult:
        """Remove a dead worker's registrations and record its death, if still dead."""
        keys = [
            self.keys.worker(worker.name),
            self.keys.worker_executions(worker.name),
            *sorted(worker.registered_in),
        ]
        args = [
            self.keys.worker(worker.name),
            worker.fields.get("last_heartbeat", ""),
            "1" if worker.exists else "0",
            format_timestamp(now),
            DEAD_WORKER_TTL_S,
            self.keys.worker_channel(worker.name),
            # Listeners read on the whole server are those of other databases when
            # none is this database's, as for a dead worker; unknown counts none.
            worker.heard_on_server or 0,
            AUDIT_STREAM,
        ]
        try:
            reply = self._worker_script(keys=keys, args=args)
        except redis.RedisError as exc:
            return _result(exc)
        return _result(reply)

    def send_stop(
        self,
        worker: str,
        job_id: str,
        queue: str,
        member: bytes,
        started_at: str,
        lease_ended_before: float,
    ) -> StopSent:
        """Ask ``worker`` to stop ``job_id`` (RQ's stop-job command), atomically only
        if the job is still started, from ``started_at``, under registry ``member``,
        the worker's hash still exists and says it is busy, and the entry's lease ends
        after ``lease_ended_before``."""
        payload = json.dumps({"command": "stop-job", "job_id": job_id})
        reply = self._stop_script(
            keys=[self.keys.job(job_id), self.keys.started(queue), self.keys.worker(worker)],
            args=[
                self.keys.worker_channel(worker),
                payload,
                started_at,
                member,
                repr(lease_ended_before),
            ],
        )
        code, detail = int(reply[0]), reply[1]
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "backslashreplace")
        if code >= 0:
            return StopSent(code)
        why = {
            -1: f"its status is now {quoted(detail)}" if detail else "the job is gone",
            -2: "it started again since it was read (a retry, or a new run of its id)",
            -3: "its registry entry is gone",
            -4: f"{worker} is {detail}, not busy, so it runs no job: its records of this one "
            "were left behind, and a stop that finds no work horse makes RQ's worker kill its "
            "own process group",
            -5: f"{worker} has stopped renewing its lease on this run, so it may not be running "
            "it, and a stop that finds no work horse makes RQ's worker kill its own process group",
            -6: f"the hash of {worker} has expired: it has not heartbeated for as long as a "
            "heartbeat keeps it, so it may be frozen rather than watching a work horse",
        }[code]
        return StopSent(0, why)


def _result(reply: Any) -> ChangeResult:
    if isinstance(reply, redis.exceptions.ReadOnlyError):
        why = f"not acted on: the server is a read-only replica now ({reply})"
        return ChangeResult(False, why, error=True, read_only=str(reply))
    if isinstance(reply, redis.exceptions.NoPermissionError):
        return ChangeResult(False, f"Redis error: {reply}", error=True, refused=str(reply))
    if isinstance(reply, Exception):
        return ChangeResult(False, f"Redis error: {reply}", error=True)
    done, detail = int(reply[0]) == 1, reply[1]
    detail = (
        detail.decode("utf-8", "backslashreplace") if isinstance(detail, bytes) else str(detail)
    )
    dependents = int(reply[2]) if len(reply) > 2 else 0
    rescues = int(reply[3]) if len(reply) > 3 else 0
    return ChangeResult(done, detail, dependents, rescues=rescues)
