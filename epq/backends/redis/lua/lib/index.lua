-- The listing indexes (QueueService.list_jobs): per value of a record's state, kind, queue,
-- priority and endpoint id, and one of every record, a sorted set whose members all score 0 and
-- sort by text: the record's creation time (ms, 13 digits), ':', its id (as
-- epq.records.index_position makes it), so that text order is creation order. Their names are
-- `<stats>:ix:<field>:<value>` and `<stats>:ix:all` (epq.backends.redis.keys.index).
-- index_record: list a stored record (`key`) in every index of its fields (op 'ZADD'), or take it
-- out of them ('ZREM'); a key without a record is left alone. index_state: move a record from the
-- index of state `old` (none when false) to that of `new`.
local function index_member(created, id)
  created = created or '0'
  return string.rep('0', 13 - #created) .. created .. ':' .. id
end

-- endpoint_index: the index of an endpoint's records; index_names: the indexes of a record of
-- these fields (an endpoint or a state false: none).
local function endpoint_index(stats, endpoint)
  return stats .. ':ix:endpoint_id:' .. endpoint
end

local function index_names(stats, kind, queue, priority, endpoint, state)
  local p = stats .. ':ix:'
  local names = {p .. 'all', p .. 'kind:' .. kind, p .. 'queue:' .. queue, p .. 'priority:' .. priority}
  if endpoint then names[#names + 1] = endpoint_index(stats, endpoint) end
  if state then names[#names + 1] = p .. 'state:' .. state end
  return names
end

local function index_record(stats, key, id, op)
  local f = redis.call('HMGET', key, 'kind', 'queue', 'priority', 'endpoint_id', 'state', 'created_at')
  if not f[1] then return end
  local member = index_member(f[6], id)
  for _, name in ipairs(index_names(stats, f[1], f[2], f[3], f[4], f[5])) do
    if op == 'ZADD' then redis.call('ZADD', name, 0, member) else redis.call('ZREM', name, member) end
  end
end

local function index_state(stats, key, id, old, new)
  local member = index_member(redis.call('HGET', key, 'created_at'), id)
  if old then redis.call('ZREM', stats .. ':ix:state:' .. old, member) end
  redis.call('ZADD', stats .. ':ix:state:' .. new, 0, member)
end
