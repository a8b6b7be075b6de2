-- #include lib/set_state.lua
-- write_new: write a new record from its fields (a JSON object of strings, `state` among them),
-- listed in its indexes (index.lua).
local function write_new(key, stats, dead, id, now, ttl, fields_json)
  local fields = cjson.decode(fields_json)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  -- a record written again (same id) first leaves the counters of its old state
  local old = redis.call('HGET', key, 'state')
  if old == 'deleted' then
    redis.call('DEL', key) -- (a deleted job's tombstone: written anew)
    old = false
  end
  if old then set_state(key, stats, dead, id, fields['state'], now) end
  redis.call('HSET', key, unpack(flat))
  index_record(stats, key, id, 'ZADD')
  if not old then
    redis.call('HINCRBY', stats, counter(fields['queue'], fields['priority'], fields['state']), 1)
    if fields['state'] == 'discarded' then redis.call('ZADD', dead, now, id) end
    if fields['state'] == 'available' then
      local index = waiting(stats, fields['queue'], fields['priority'])
      local due = fields['scheduled_at'] or fields['created_at'] or now
      if index then redis.call('ZADD', index, due, id) end
    end
  end
  redis.call('PEXPIRE', key, ttl)
  return fields
end
