-- #include lib/lane_of.lua
-- Take up to ARGV[3] messages for a worker, highest priority first.
-- KEYS: plain list, message hash, this worker's ack set, heartbeats, lane 1..4; ARGV: now ms,
-- worker id, how many to take, how many plain-list ids to move back at most, job record key
-- prefix ('' when records live elsewhere).
-- Returns {id1, data1, id2, data2, ...}. Ids found on the plain list (put back there by Dramatiq's
-- requeue or its recovery of a dead worker's messages) first go back to the front of their lane.
-- A job whose record is cancelled (or a deleted job's tombstone) is dropped here, never delivered. Records are not started
-- here: a job is running once a worker thread starts it, not while it waits in a prefetch.
local plain, msgs, acks = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[5]
local function cancelled(data)
  if prefix == '' then return false end
  local ok, message = pcall(cjson.decode, data)
  if not (ok and type(message) == 'table' and type(message['message_id']) == 'string') then return false end
  local state = redis.call('HGET', prefix .. message['message_id'], 'state')
  return state == 'cancelled' or state == 'deleted'
end
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
for _ = 1, tonumber(ARGV[4]) do
  local id = redis.call('RPOP', plain)
  if not id then break end
  local data = redis.call('HGET', msgs, id)
  if data then redis.call('LPUSH', KEYS[4 + lane_of(data)], id) end
end
local out = {}
local want = 2 * tonumber(ARGV[3])
for lane = 1, 4 do
  while #out < want do
    local id = redis.call('LPOP', KEYS[4 + lane])
    if not id then break end
    local data = redis.call('HGET', msgs, id)
    if data then
      if cancelled(data) then
        redis.call('HDEL', msgs, id)
      else
        redis.call('SADD', acks, id)
        out[#out + 1] = id
        out[#out + 1] = data
      end
    end
  end
  if #out >= want then break end
end
return out
