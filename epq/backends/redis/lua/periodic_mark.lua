-- Note a periodic job's tick as enqueued, unless a later tick is noted already: the noted tick
-- only moves forward, whatever order the workers' notes arrive in.
-- KEYS: the schedule's state; ARGV: tick ms, job id, now ms, ttl ms. Returns 1 when noted.
local noted = redis.call('HGET', KEYS[1], 'tick')
if noted and tonumber(noted) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'tick', ARGV[1], 'job', ARGV[2], 'at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
