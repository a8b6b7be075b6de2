-- #include lib/set_state.lua
-- #include lib/keep_dead.lua
-- Append an attempt error (the newest `max errors` kept) and set the state (a discarded job is
-- kept among the newest dead: see keep_newest).
-- KEYS: record, stats, dead; ARGV: id, now, ttl, new state, error json, max errors, dead records
-- kept at most, job record key prefix, f1, v1, ...
local before = redis.call('HGET', KEYS[1], 'state')
if not before or before == 'deleted' then return false end -- (none, or a deleted job's tombstone)
local errors = cjson.decode(redis.call('HGET', KEYS[1], 'errors') or '[]')
local err = cjson.decode(ARGV[5])
err['attempt'] = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
table.insert(errors, err)
while #errors > tonumber(ARGV[6]) do table.remove(errors, 1) end
redis.call('HSET', KEYS[1], 'errors', cjson.encode(errors))
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[4], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] == 'discarded' then keep_dead(KEYS[3], KEYS[2], ARGV[7], ARGV[8]) end
return 1
