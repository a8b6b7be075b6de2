-- #include lib/take_lock.lua
-- #include lib/counter.lua
-- #include lib/lock_digest.lua
-- #include lib/index.lua
-- Many enqueues as enqueue_recorded.lua does one, in order, in one script (bulk enqueue of
-- immediate jobs). A later job with the same unique key as an earlier one in the batch finds the
-- earlier one's lock. Jobs of a batch share most of their record fields, so those come once per
-- group (kind, queue, priority, attempts, creation time); each job brings its id, lock, message
-- and payload (kept once: in the message, not in the record). Counters, message hashes and lanes
-- are written once per group, not once per job; ids go onto each lane in request order. A job's
-- redis message id is its id.
-- KEYS: stats, the call's token (a key of its own, where the first run of a call leaves its reply:
-- a second run of the same call, sent when the first one's reply was lost, returns that reply and
-- writes nothing).
-- ARGV: record key prefix, record ttl, Dramatiq's Redis namespace, token ttl, number of groups G,
-- 8 per group: record fields but args and the lock (a JSON object), the lock holder value after
-- the job id, the lock ttl, and five fragments f1..f5 of its jobs' encoded messages (see
-- epq._messages.data_template); then 6 per job: group (1..G), id, lock key or '', message data
-- ('': f1 .. payload .. f2 .. lock key .. f3 .. id .. f4 .. id .. f5), payload (JSON), endpoint id
-- (or ''). Each record is listed in its indexes (index.lua), once per group and endpoint.
-- Returns {position, holder, ...} for the jobs that are duplicates (position: 1 = first job).
local done = redis.call('GET', KEYS[2])
if done then return cjson.decode(done) end
local prefix, ttl, ns, ngroups = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local groups, hashes, lanes = {}, {}, {}
for g = 1, ngroups do
  local at = 6 + 8 * (g - 1)
  local fields = cjson.decode(ARGV[at])
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  local queue = ns .. ':' .. fields['queue']
  local lane = queue .. '.P' .. fields['priority']
  hashes[queue .. '.msgs'] = hashes[queue .. '.msgs'] or {}
  lanes[lane] = lanes[lane] or {}
  groups[g] = {flat = flat, n = 0, msgs = hashes[queue .. '.msgs'], ids = lanes[lane],
    stat = counter(fields['queue'], fields['priority'], fields['state']), due = {}, listed = {},
    indexes = index_names(KEYS[1], fields['kind'], fields['queue'], fields['priority'], false, fields['state']),
    waiting = fields['state'] == 'available' and waiting(KEYS[1], fields['queue'], fields['priority']),
    scheduled_at = fields['scheduled_at'] or fields['created_at'], created = fields['created_at'],
    tail = ARGV[at + 1], lock_ttl = ARGV[at + 2], f = {ARGV[at + 3], ARGV[at + 4], ARGV[at + 5],
    ARGV[at + 6], ARGV[at + 7]}}
end
local out, position, by_endpoint = {}, 0, {}
for i = 6 + 8 * ngroups, #ARGV, 6 do
  position = position + 1
  local group, id, lock = groups[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  local key = prefix .. id
  local current = false
  if lock ~= '' then current = take_lock(lock, id .. group.tail, group.lock_ttl, id) end
  if current == false then
    if lock ~= '' then
      redis.call('HSET', key, 'unique_digest', lock_digest(lock), unpack(group.flat))
    else
      redis.call('HSET', key, unpack(group.flat))
    end
    local member = index_member(group.created, id)
    group.listed[#group.listed + 1] = 0
    group.listed[#group.listed + 1] = member
    local endpoint = ARGV[i + 5]
    if endpoint ~= '' then
      redis.call('HSET', key, 'endpoint_id', endpoint)
      local name = endpoint_index(KEYS[1], endpoint)
      by_endpoint[name] = by_endpoint[name] or {}
      local listed = by_endpoint[name]
      listed[#listed + 1] = 0
      listed[#listed + 1] = member
    end
    redis.call('PEXPIRE', key, ttl)
    group.n = group.n + 1
    local data = ARGV[i + 3]
    if data == '' then
      local f = group.f
      data = f[1] .. ARGV[i + 4] .. f[2] .. lock .. f[3] .. id .. f[4] .. id .. f[5]
    end
    group.msgs[#group.msgs + 1] = id
    group.msgs[#group.msgs + 1] = data
    group.ids[#group.ids + 1] = id
    group.due[#group.due + 1] = group.scheduled_at
    group.due[#group.due + 1] = id
  else
    out[#out + 1] = position
    out[#out + 1] = current
  end
end
-- (unpack takes a few thousand values at most: epq.insert.SCRIPT_RUN keeps calls well under that)
for _, group in ipairs(groups) do
  if group.n > 0 then redis.call('HINCRBY', KEYS[1], group.stat, group.n) end
  if group.n > 0 and group.waiting then redis.call('ZADD', group.waiting, unpack(group.due)) end
  if group.n > 0 then
    for _, name in ipairs(group.indexes) do redis.call('ZADD', name, unpack(group.listed)) end
  end
end
for name, listed in pairs(by_endpoint) do redis.call('ZADD', name, unpack(listed)) end
for key, entries in pairs(hashes) do
  if #entries > 0 then redis.call('HSET', key, unpack(entries)) end
end
for key, ids in pairs(lanes) do
  if #ids > 0 then redis.call('RPUSH', key, unpack(ids)) end
end
redis.call('SET', KEYS[2], cjson.encode(out), 'PX', ARGV[4])
return out
