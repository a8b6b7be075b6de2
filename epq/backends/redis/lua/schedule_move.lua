-- #include lib/set_state.lua
-- #include lib/lane_of.lua
-- Move due messages straight into the Redis broker's queues (the hash of messages by their
-- redis_message_id, and the list of ids of their priority lane), in one atomic step, and mark
-- their records available.
-- KEYS: schedule, data, stats, dead, unreadable; ARGV: now ms, limit, Dramatiq's namespace, job
-- key prefix. Returns {count moved, next due time or false}.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(ids) do
  local data = redis.call('HGET', KEYS[2], id)
  local ok, message = false, nil
  if data then ok, message = pcall(cjson.decode, data) end
  local rid = ok and type(message) == 'table' and type(message['options']) == 'table'
    and message['options']['redis_message_id']
  if data and not (rid and type(message['queue_name']) == 'string') then
    -- not a message this script can move: set it aside rather than block the schedule
    redis.call('HSET', KEYS[5], id, data)
  elseif data then
    local queue = ARGV[3] .. ':' .. message['queue_name']
    redis.call('HSET', queue .. '.msgs', rid, data)
    redis.call('RPUSH', queue .. '.P' .. lane_of(data), rid)
    moved = moved + 1
    local record = ARGV[4] .. message['message_id']
    local state = redis.call('HGET', record, 'state')
    if state == 'scheduled' or state == 'retryable' then
      set_state(record, KEYS[3], KEYS[4], message['message_id'], 'available', ARGV[1])
    end
  end
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false}
