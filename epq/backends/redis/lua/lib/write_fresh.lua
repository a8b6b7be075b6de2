-- #include lib/counter.lua
-- #include lib/index.lua
-- write_fresh: write a record that does not exist yet, from the name, value pairs ARGV[first], ...
-- (a state that is not 'discarded' among them), and count it under `group` (queue|priority|state)
-- (an available one also in its waiting index: see counter.lua), and list it (index.lua).
local function write_fresh(key, stats, ttl, first, group, id)
  redis.call('HSET', key, unpack(ARGV, first))
  redis.call('HINCRBY', stats, group, 1)
  index_record(stats, key, id, 'ZADD')
  local queue, priority, state = string.match(group, '^(.*)|([^|]*)|([^|]*)$')
  if state == 'available' then
    local index = waiting(stats, queue, priority)
    if index then redis.call('ZADD', index, due_at(key, 0), id) end
  end
  redis.call('PEXPIRE', key, ttl)
end
