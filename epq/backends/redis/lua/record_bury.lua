-- #include lib/forget_record.lua
-- Delete a job's record as record_delete.lua does and leave a tombstone in its place (state
-- 'deleted', nothing else, for `ttl` ms): a worker skips the job's message as a cancelled one's,
-- and no later transition writes the record again. KEYS: record, stats, dead; ARGV: id, ttl ms.
-- Returns the state the record had, or false when there was none.
local state = forget_record(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if not state then return false end
redis.call('HSET', KEYS[1], 'state', 'deleted')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return state
