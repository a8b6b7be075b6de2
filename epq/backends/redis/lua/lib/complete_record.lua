-- #include lib/set_state.lua
-- complete_record: mark a running record completed (finalized now, kept for ttl).
local function complete_record(key, stats, dead, id, now, ttl)
  if redis.call('HGET', key, 'state') ~= 'running' then return end
  redis.call('HSET', key, 'finalized_at', now)
  set_state(key, stats, dead, id, 'completed', now)
  redis.call('PEXPIRE', key, ttl)
end
