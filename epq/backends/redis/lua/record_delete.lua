-- Delete a record, its counter and its dead entry. KEYS: record, stats, dead; ARGV: id.
redis.call('ZREM', KEYS[3], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local group = redis.call('HGET', KEYS[1], 'queue') .. '|' .. redis.call('HGET', KEYS[1], 'priority') .. '|'
redis.call('HINCRBY', KEYS[2], group .. state, -1)
redis.call('DEL', KEYS[1])
return 1
