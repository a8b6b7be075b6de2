-- #include lib/start_record.lua
-- Mark a job running. KEYS: record, stats, dead; ARGV: id, now, ttl. Returns the state before.
return start_record(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
