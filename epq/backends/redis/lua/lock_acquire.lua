-- #include lib/take_lock.lua
-- Take a uniqueness lock. KEYS: the lock; ARGV: holder value, ttl ms.
-- Returns false when the holder's job now holds the lock, the current holder value otherwise.
return take_lock(KEYS[1], ARGV[1], ARGV[2], holder_id(ARGV[1]))
