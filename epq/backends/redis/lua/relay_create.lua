-- #include lib/write_new.lua
-- #include lib/take_lock.lua
-- Write the jobs of a relay's batch (epq.outbox), in one atomic step: for each, unless it is
-- marked relayed already (reply 1: nothing written), take its uniqueness lock (when another job
-- holds it, the reply is that holder value and nothing is written), write its record, add its
-- message to the schedule (once per entry id, as schedule_add.lua) and mark it relayed for as
-- long as its record lives (reply 0).
-- KEYS: stats, dead, schedule, schedule data; ARGV: now ms, record key prefix, mark prefix, then
-- nine per job: id, record ttl, record fields (JSON), lock key ('' for none), holder value, lock
-- ttl, schedule entry id, message, due ms.
local replies = {}
for i = 4, #ARGV, 9 do
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
    if redis.call('HSETNX', KEYS[4], ARGV[i + 6], ARGV[i + 7]) == 1 then
      redis.call('ZADD', KEYS[3], ARGV[i + 8], ARGV[i + 6])
    end
    redis.call('SET', mark, 1, 'PX', ttl)
  end
  replies[#replies + 1] = reply
end
return replies
