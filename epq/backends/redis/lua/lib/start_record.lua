-- #include lib/set_state.lua
-- start_record: mark a record running (one more attempt) unless cancelled or deleted (a
-- tombstone: record_bury.lua); returns the state before, or false when there is no record.
local function start_record(key, stats, dead, id, now, ttl)
  local old = redis.call('HGET', key, 'state')
  if not old then return false end
  if old == 'cancelled' or old == 'deleted' then return old end
  set_state(key, stats, dead, id, 'running', now)
  redis.call('HINCRBY', key, 'attempt', 1)
  redis.call('HSET', key, 'attempted_at', now)
  redis.call('PEXPIRE', key, ttl)
  return old
end
