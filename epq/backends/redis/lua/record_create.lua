-- #include lib/write_new.lua
-- Write a new record. KEYS: record, stats, dead; ARGV: id, now, ttl, fields (JSON).
write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
