-- #include lib/write_new.lua
-- #include lib/take_lock.lua
-- Take the uniqueness lock (unless another job holds it: then return that holder and write
-- nothing) and write the new record, in one round trip.
-- KEYS: record, stats, dead, lock; ARGV: id, now, ttl, lock holder, lock ttl, fields (JSON).
local current = take_lock(KEYS[4], ARGV[4], ARGV[5], ARGV[1])
if current then return current end
write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
return false
