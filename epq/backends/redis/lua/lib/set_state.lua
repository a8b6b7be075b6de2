-- #include lib/counter.lua
-- #include lib/index.lua
-- set_state: move a record to a state, keeping the per queue|priority|state counters and the
-- index of dead (discarded) jobs and of waiting (available) ones, and the listing index of its
-- state (index.lua); returns the state before.
local function set_state(key, stats, dead, id, new_state, now)
  local old = redis.call('HGET', key, 'state')
  local at = redis.call('HMGET', key, 'queue', 'priority')
  if old then redis.call('HINCRBY', stats, counter(at[1], at[2], old), -1) end
  redis.call('HINCRBY', stats, counter(at[1], at[2], new_state), 1)
  redis.call('HSET', key, 'state', new_state)
  if old ~= new_state then index_state(stats, key, id, old, new_state) end
  if new_state == 'discarded' then redis.call('ZADD', dead, now, id) end
  if old == 'discarded' and new_state ~= 'discarded' then redis.call('ZREM', dead, id) end
  if new_state == 'available' and old ~= 'available' then
    local index = waiting(stats, at[1], at[2])
    if index then redis.call('ZADD', index, due_at(key, now), id) end
  elseif old == 'available' and new_state ~= 'available' then
    local index = waiting(stats, at[1], at[2])
    if index then redis.call('ZREM', index, id) end
  end
  return old
end
