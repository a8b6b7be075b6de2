-- #include lib/set_state.lua
-- #include lib/keep_done.lua
-- complete_record: mark a running record completed (finalized now, kept for ttl, and among the
-- newest `max` completed: see keep_done); whether it was (a record that is not running is left
-- as it is).
local function complete_record(key, stats, dead, done, id, now, ttl, max, prefix)
  if redis.call('HGET', key, 'state') ~= 'running' then return false end
  redis.call('HSET', key, 'finalized_at', now)
  set_state(key, stats, dead, id, 'completed', now)
  redis.call('PEXPIRE', key, ttl)
  keep_done(done, stats, id, now, max, prefix)
  return redis.call('EXISTS', key) == 1
end
