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

local function index_record(stats, key, id, op)
  local f = redis.call('HMGET', key, 'kind', 'queue', 'priority', 'endpoint_id', 'state', 'created_at')
  if not f[1] then return end
  local member = index_member(f[6], id)
  local p = stats .. ':ix:'
  local names = {p .. 'all', p .. 'kind:' .. f[1], p .. 'queue:' .. f[2], p .. 'priority:' .. f[3]}
  if f[4] then names[#names + 1] = p .. 'endpoint_id:' .. f[4] end
  if f[5] then names[#names + 1] = p .. 'state:' .. f[5] end
  for _, name in ipairs(names) do
    if op == 'ZADD' then redis.call('ZADD', name, 0, member) else redis.call('ZREM', name, member) end
  end
end

local function index_state(stats, key, id, old, new)
  local member = index_member(redis.call('HGET', key, 'created_at'), id)
  if old then redis.call('ZREM', stats .. ':ix:state:' .. old, member) end
  redis.call('ZADD', stats .. ':ix:state:' .. new, 0, member)
end
