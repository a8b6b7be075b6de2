-- #include lib/write_new.lua
-- #include lib/keep_dead.lua
-- Write a new record (a discarded one is kept among the newest dead: see keep_newest).
-- KEYS: record, stats, dead; ARGV: id, now, ttl, fields (JSON), dead records kept at most, job
-- record key prefix.
local fields = write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if fields['state'] == 'discarded' then keep_dead(KEYS[3], KEYS[2], ARGV[5], ARGV[6]) end
return 1
