-- #include lib/write_new.lua
-- #include lib/take_lock.lua
-- #include lib/keep_dead.lua
-- Take the uniqueness lock (unless another job holds it: then return that holder and write
-- nothing) and write the new record, in one round trip (a discarded one is kept among the newest
-- dead: see keep_newest).
-- KEYS: record, stats, dead, lock; ARGV: id, now, ttl, lock holder, lock ttl, fields (JSON), dead
-- records kept at most, job record key prefix.
local current = take_lock(KEYS[4], ARGV[4], ARGV[5], ARGV[1])
if current then return current end
local fields = write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
if fields['state'] == 'discarded' then keep_dead(KEYS[3], KEYS[2], ARGV[7], ARGV[8]) end
return false
