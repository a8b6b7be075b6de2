-- #include lib/holder_id.lua
-- Free a uniqueness lock if `job id` holds it. KEYS: the lock; ARGV: job id. Returns 1 if freed.
local current = redis.call('GET', KEYS[1])
if current and holder_id(current) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
