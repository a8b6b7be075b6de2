-- Let the next job of a serial key go (epq.serial): if the job heads the key's sequence, drop
-- it, and put the held message of the job after it into the schedule, due when it was to be.
-- With ARGV[2] '1' (a job cancelled before its turn), a job that is not the head leaves the
-- sequence too, its held message dropped.
-- KEYS: sequence, held, schedule, data; ARGV: job id, '1' to withdraw a job from anywhere.
-- Returns 1 when the job was the head, 0 otherwise.
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then
  if ARGV[2] == '1' then
    redis.call('LREM', KEYS[1], 0, ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
  return 0
end
redis.call('LPOP', KEYS[1])
local nxt = redis.call('LINDEX', KEYS[1], 0)
if nxt then
  local held = redis.call('HGET', KEYS[2], nxt)
  if held then
    redis.call('HDEL', KEYS[2], nxt)
    local a = string.find(held, '|', 1, true)
    local b = string.find(held, '|', a + 1, true)
    local due, entry, message = string.sub(held, 1, a - 1), string.sub(held, a + 1, b - 1), string.sub(held, b + 1)
    if redis.call('HSETNX', KEYS[4], entry, message) == 1 then
      redis.call('ZADD', KEYS[3], due, entry)
    end
  end
end
return 1
