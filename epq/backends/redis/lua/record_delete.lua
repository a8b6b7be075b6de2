-- #include lib/counter.lua
-- Delete a record, its counter and its dead entry. KEYS: record, stats, dead; ARGV: id.
redis.call('ZREM', KEYS[3], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
redis.call('HINCRBY', KEYS[2], record_counter(KEYS[1], state), -1)
if state == 'available' then
  local at = redis.call('HMGET', KEYS[1], 'queue', 'priority')
  redis.call('ZREM', waiting(KEYS[2], at[1], at[2]), ARGV[1])
end
redis.call('DEL', KEYS[1])
return 1
