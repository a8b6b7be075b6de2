-- #include lib/forget_record.lua
-- Delete a record, its counter, its dead entry and its listings. KEYS: record, stats, dead;
-- ARGV: id. Returns 1 when there was one.
if forget_record(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) then return 1 end
return 0
