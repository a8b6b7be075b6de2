-- #include lib/set_state.lua
-- #include lib/keep_done.lua
-- #include lib/keep_dead.lua
-- Set a record's state if its current one is allowed, with more fields; a completed one is kept
-- among the newest completed, a discarded one among the newest dead (see keep_newest).
-- KEYS: record, stats, dead, completed index; ARGV: id, now, ttl, new state, allowed (comma list,
-- '' = any), completed records kept at most, job record key prefix, dead records kept at most,
-- f1, v1, ...
-- Returns the state before, or false when there is no record ('deleted' for a tombstone, left as
-- it is).
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return false end
if old == 'deleted' then return old end -- (a deleted job's tombstone: see record_bury.lua)
if ARGV[5] ~= '' and not string.find(',' .. ARGV[5] .. ',', ',' .. old .. ',', 1, true) then return old end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[4], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if ARGV[4] == 'completed' and old ~= 'completed' then
  keep_done(KEYS[4], KEYS[2], ARGV[1], ARGV[2], ARGV[6], ARGV[7])
end
if ARGV[4] == 'discarded' then keep_dead(KEYS[3], KEYS[2], ARGV[8], ARGV[7]) end
return old
