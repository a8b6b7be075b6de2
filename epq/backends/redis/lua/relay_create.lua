-- #include lib/write_new.lua
-- #include lib/take_lock.lua
-- Write the jobs of a relay's batch (epq.outbox), in one atomic step: for each, unless it is
-- marked relayed already (reply 1: nothing written), take its uniqueness lock (when another job
-- holds it, the reply is that holder value and nothing is written), write its record, add its
-- message to the schedule (once per entry id, as schedule_add.lua) and mark it relayed for as
-- long as its record lives (reply 0). A job with a serial key joins the end of its key's sequence
-- and, unless it is the head, its message waits held instead (as serial_add.lua).
-- KEYS: stats, dead, schedule, schedule data, serial held; ARGV: now ms, record key prefix, mark
-- prefix, serial sequence prefix, then ten per job: id, record ttl, record fields (JSON), lock key
-- ('' for none), holder value, lock ttl, schedule entry id, message, due ms, serial key ('' for
-- none).
local function held(id, serial, value)
  if serial == '' then return false end
  local sequence = ARGV[4] .. serial
  local head = redis.call('LINDEX', sequence, 0)
  if not head then
    redis.call('RPUSH', sequence, id)
    return false
  end
  if head == id then return false end
  if not redis.call('LPOS', sequence, id) then redis.call('RPUSH', sequence, id) end
  redis.call('HSET', KEYS[5], id, value)
  return true
end

local replies = {}
for i = 5, #ARGV, 10 do
  local id, ttl, lock_key = ARGV[i], ARGV[i + 1], ARGV[i + 3]
  local mark = ARGV[3] .. id
  local reply = 0
  if redis.call('EXISTS', mark) == 1 then
    reply = 1
  elseif lock_key ~= '' then
    reply = take_lock(lock_key, ARGV[i + 4], ARGV[i + 5], id) or 0
  end
  if reply == 0 then
    write_new(ARGV[2] .. id, KEYS[1], KEYS[2], id, ARGV[1], ttl, ARGV[i + 2])
    local value = ARGV[i + 8] .. '|' .. ARGV[i + 6] .. '|' .. ARGV[i + 7]
    if not held(id, ARGV[i + 9], value) and redis.call('HSETNX', KEYS[4], ARGV[i + 6], ARGV[i + 7]) == 1 then
      redis.call('ZADD', KEYS[3], ARGV[i + 8], ARGV[i + 6])
    end
    redis.call('SET', mark, 1, 'PX', ttl)
  end
  replies[#replies + 1] = reply
end
return replies
