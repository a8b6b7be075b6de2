-- #include lib/write_new.lua
-- #include lib/holder_id.lua
-- What a duplicate enqueued in uniqueness mode replace or debounce does (epq.middleware.modes), decided and
-- done in one atomic step (RecordStore.resolve_duplicate):
-- - the job holding the lock was inserted in such a mode and has not started (available,
--   scheduled, or a follow-up running only to find that the job it follows has not ended): its
--   record takes the duplicate's payload ('args', 'replaced' + 1); in debounce, its first wait in
--   the schedule (entry '<id>:0') moves later, to now + delay but never past created + max wait,
--   and the lock lasts the window past it. Reply {'replaced', holder id}.
-- - the holder started (or was inserted in keep_first): the duplicate becomes its follow-up (its
--   record with 'after' = the holder's id, its message in the schedule, the lock its own).
--   Reply {'follow-up', id}.
-- - the holder ended (or has no record), or the lock is free: the duplicate is written and
--   scheduled the same way, without 'after'. Reply {'taken over', id}.
-- KEYS: stats, dead, schedule, schedule data, lock, replaced counts (a hash: kind -> count);
-- ARGV: now ms, record key prefix, mode, id, record ttl, record fields (JSON), holder value, lock
-- ttl, schedule entry id, message, due ms, payload (JSON), debounce ms, max wait ms, window ms.
local now, prefix, id = tonumber(ARGV[1]), ARGV[2], ARGV[4]
local ended = {completed = true, discarded = true, cancelled = true}

local function insert(after)
  local key = prefix .. id
  redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[8])
  write_new(key, KEYS[1], KEYS[2], id, ARGV[1], ARGV[5], ARGV[6])
  if after then redis.call('HSET', key, 'after', after) end
  if redis.call('HSETNX', KEYS[4], ARGV[9], ARGV[10]) == 1 then
    redis.call('ZADD', KEYS[3], ARGV[11], ARGV[9])
  end
end

local current = redis.call('GET', KEYS[5])
if not current then
  insert(false)
  return {'taken over', id}
end
local holder = holder_id(current)
if holder == id then return {'taken over', id} end -- (a call sent again)
local hkey = prefix .. holder
local found = redis.call('HMGET', hkey, 'state', 'unique_mode', 'after', 'kind', 'created_at')
local state, mode, after = found[1], found[2], found[3]
if (not state) or ended[state] then
  insert(false)
  return {'taken over', id}
end
local waiting = state == 'available' or state == 'scheduled'
if state == 'running' and after then
  local before = redis.call('HGET', prefix .. after, 'state')
  waiting = before and not ended[before]
end
if not (waiting and mode) then
  insert(holder)
  return {'follow-up', id}
end
redis.call('HSET', hkey, 'args', ARGV[12])
redis.call('HINCRBY', hkey, 'replaced', 1)
redis.call('HINCRBY', KEYS[6], found[4], 1)
if ARGV[3] == 'debounce' and state == 'scheduled' then
  local entry = holder .. ':0'
  local old = redis.call('ZSCORE', KEYS[3], entry)
  local due = math.min(now + tonumber(ARGV[13]), tonumber(found[5] or now) + tonumber(ARGV[14]))
  if old and due > tonumber(old) then
    redis.call('ZADD', KEYS[3], 'XX', due, entry)
    redis.call('HSET', hkey, 'scheduled_at', due)
    local ttl = tonumber(ARGV[15]) + due - now
    if redis.call('PTTL', KEYS[5]) < ttl then redis.call('PEXPIRE', KEYS[5], ttl) end
  end
end
return {'replaced', holder}
