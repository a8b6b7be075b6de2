-- #include lib/counter.lua
-- #include lib/index.lua
-- forget_record: delete a record with its count, its dead entry, its waiting entry and its
-- listings; returns the state it had, or false when there is none (a deleted job's tombstone
-- counts as none and stays).
local function forget_record(key, stats, dead, id)
  redis.call('ZREM', dead, id)
  local state = redis.call('HGET', key, 'state')
  if not state or state == 'deleted' then return false end
  redis.call('HINCRBY', stats, record_counter(key, state), -1)
  if state == 'available' then
    local at = redis.call('HMGET', key, 'queue', 'priority')
    local index = waiting(stats, at[1], at[2])
    if index then redis.call('ZREM', index, id) end
  end
  index_record(stats, key, id, 'ZREM')
  redis.call('DEL', key)
  return state
end
