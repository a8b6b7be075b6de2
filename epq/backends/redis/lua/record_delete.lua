-- #include lib/counter.lua
-- Delete a record, its counter and its dead entry. KEYS: record, stats, dead; ARGV: id.
redis.call('ZREM', KEYS[3], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
redis.call('HINCRBY', KEYS[2], record_counter(KEYS[1], state), -1)
if state == 'available' then
  local at = redis.call('HMGET', KEYS[1], 'queue', 'priority')
  local index = waiting(KEYS[2], at[1], at[2])
  if index then redis.call('ZREM', index, ARGV[1]) end
end
redis.call('DEL', KEYS[1])
return 1
