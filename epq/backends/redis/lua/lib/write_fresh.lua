-- write_fresh: write a record that does not exist yet, from the name, value pairs ARGV[first], ...
-- (a state that is not 'discarded' among them), and count it under `group` (queue|priority|state).
local function write_fresh(key, stats, ttl, first, group)
  redis.call('HSET', key, unpack(ARGV, first))
  redis.call('HINCRBY', stats, group, 1)
  redis.call('PEXPIRE', key, ttl)
end
